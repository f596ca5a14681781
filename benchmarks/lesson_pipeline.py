"""The whole lesson-1 pipeline on a generated Pets-sized dataset: per stage wall, work, phases, non-epoch seconds, disk.

A copy of this checkout (its tracked and untracked files), or of another revision (``--revisions``), in a scratch
folder runs every stage of its dvc.yaml, one `dvc repro --single-item` per stage so each is timed on its own, with
the revision's own pets profile (its epochs, LRs and sizes) and ``train.weights: none`` (no download). Stage
processes start cold (``PETPIPE_WARM=0`` unless set). The dataset: ``--images`` JPEGs of 500x375 in ``--classes``
classes, named as the Pets archive names them (``<breed>_<n>.jpg``), in a local tar archive made once per run
(``--archive`` keeps it for the next run and for ``fastai_lesson.py``) and shared by every revision and round.

Per stage it prints:

- wall s:           the `dvc repro --single-item` command, start to exit (DVC's hashing, lock and cache included)
- tracked work s:   ``<stage>_seconds`` the stage's MLflow run logs on the execution's parent run
- start-up s, teardown s, phases: the stage's own record (``metrics/timing/<stage>.json``: ``startup_seconds``,
                    ``teardown_seconds`` and, from issue 20 on, ``phases``: ``{name: seconds}``); "-" where a
                    revision does not record them
- epochs s:         the sum of ``epoch_seconds`` in the stage's curves (plots/train_frozen.csv, plots/finetune.csv):
                    the training and validation passes of its epochs; read from the curves so old revisions count
- non-epoch s:      wall minus epochs: everything around the epochs (the cost issue 20 is about)
- disk MB:          what the stage adds to the repository's disk: its outputs in the workspace plus what DVC puts
                    in .dvc/cache (and mlflow.db, the MLflow artifacts), as allocated blocks (``st_blocks * 512``)
                    of the whole tree, each inode once (a hard link is not a second copy), after the stage minus
                    before it. A tree walk rather than ``/proc/<pid>/io``: ``write_bytes`` is lost for the
                    processes DVC starts once they exit, counts temp files deleted again, and misses what the page
                    cache has not flushed yet; the walk measures what stays on disk.
- train images/s:   the training stages' last-epoch ``train_images_per_s``

Variants (``--cpu`` and ``--dry-run`` combine):

- default:          7,390 images of 500x375 in 37 classes, the pets profile (resnet34 at 224 px, presize 460, 4 +
                    2 epochs, lr_find 100 iterations): the real lesson's work, for a GPU
- ``--cpu``:        the same 7,390 images and presize 460 (the pets profile's store, hashing and disk: the part
                    around the epochs is the real lesson's), but resnet18 at 32 px, batch 64, 1 frozen epoch,
                    lr_find 20 iterations, 1 fine-tuning epoch: a few minutes on 2 cores, of which the epochs are
                    well under half, so a change to the non-epoch cost shows. 32 px, not 64: at 64 px one epoch of
                    resnet18 takes about 4x as long on 2 cores and would only add epoch seconds that are subtracted
- ``--dry-run``:    60 images of 64x48 in 3 classes, presize 48, resnet18 at 32 px, batch 8, one epoch each, lr_find
                    10 iterations: seconds, for CI
- ``--cpu --dry-run``: the ``--cpu`` recipe on 148 images of 500x375 (4 per class, 37 classes), presize 460,
                    batch 32, lr_find 10 iterations: the test of this script (tests/test_lesson_pipeline.py)

A/B: ``--revisions e1d50d3 WORKTREE --rounds 2`` runs both in alternation (A, B, A, B) on the same archive and
prints each run's table, then a comparison of the medians per stage (non-epoch seconds, disk MB, new/old). Each run
starts after an ``os.sync()``, so that it does not pay for the writeback of the run before it.

    python benchmarks/lesson_pipeline.py                      # 7,390 images, 37 classes: the real lesson's size
    python benchmarks/lesson_pipeline.py --cpu                # the same data and store, a small model: CPU
    python benchmarks/lesson_pipeline.py --cpu --revisions e1d50d3 WORKTREE --rounds 2
    python benchmarks/lesson_pipeline.py --dry-run            # 60 tiny images, 32 px, one epoch each: seconds, CPU
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WORKTREE = "WORKTREE"  # a revision name: this checkout as it is on disk, uncommitted changes included
ARCHIVE_NAME = "pets.tar"  # the archive inside each scratch repository: data.url
LABEL_PATTERN = r"^(.+)_\d+\.jpg$"  # the pets profile's labels.pattern: fastai_lesson.py labels the same way
CURVES = {"train_frozen": "plots/train_frozen.csv", "finetune": "plots/finetune.csv"}  # dvc.yaml's paths


@dataclass(frozen=True)
class Variant:
    """A dataset and the params that differ from the pets profile."""

    name: str
    images: int
    classes: int
    width: int
    height: int
    params: dict = field(default_factory=dict)  # {section: {key: value}} over the profile


CPU_RECIPE = {
    "train": {"arch": "resnet18", "size": 32, "batch_size": 64},
    "train_frozen": {"epochs": 1},
    "lr_find": {"num_it": 20},
    "finetune": {"epochs": 1},
}
VARIANTS = {
    "lesson": Variant("lesson", 7390, 37, 500, 375),
    "cpu": Variant("cpu", 7390, 37, 500, 375, CPU_RECIPE),
    "dry": Variant("dry run", 60, 3, 64, 48, {
        "presize": {"size": 48}, "train": {"arch": "resnet18", "size": 32, "batch_size": 8},
        "train_frozen": {"epochs": 1}, "lr_find": {"num_it": 10}, "finetune": {"epochs": 1}}),  # fmt: skip
    "cpu-dry": Variant("cpu dry run", 148, 37, 500, 375,
                       CPU_RECIPE | {"train": CPU_RECIPE["train"] | {"batch_size": 32}, "lr_find": {"num_it": 10}}),
}  # fmt: skip


def jpeg(seed: int, width: int, height: int) -> bytes:
    """A photo-sized JPEG of smooth random colour (compresses like a photo, decodes at a photo's cost)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_archive(out: Path, *, images: int, classes: int, width: int, height: int) -> Path:
    """``pets/images/<breed>_<n>.jpg`` for ``classes`` breeds, as one uncompressed tar (the same bytes every time)."""
    names = [f"breed{c:02d}_{i}.jpg" for i in range(images // classes + 1) for c in range(classes)][:images]
    with ProcessPoolExecutor() as pool:
        blobs = list(pool.map(jpeg, range(len(names)), [width] * len(names), [height] * len(names), chunksize=64))
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w") as tar:
        for name, blob in zip(names, blobs):
            info = tarfile.TarInfo(f"pets/images/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    partial.replace(out)  # a killed run leaves no archive that looks complete
    return out


def lesson_archive(folder: Path, variant: Variant) -> Path:
    """The variant's generated archive in ``folder``, made there unless an earlier run left it."""
    out = folder / f"pets-{variant.images}x{variant.classes}-{variant.width}x{variant.height}.tar"
    if not out.exists():
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        write_archive(out, images=variant.images, classes=variant.classes, width=variant.width, height=variant.height)
        print(f"dataset: {variant.images} JPEGs of {variant.width}x{variant.height} in {variant.classes} classes, "
              f"{time.perf_counter() - started:.1f} s, {out}", flush=True)  # fmt: skip
    return out


def extract_images(archive: Path, dest: Path) -> Path:
    """The archive's ``pets/images`` folder under ``dest`` (what the fetch stage extracts), for fastai_lesson.py."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / "pets" / "images"


GIT = shutil.which("git")
# Never part of a checkout's copy where git cannot list it (the GPU machine's copy of the working tree has no .git,
# and none of the ignored outputs): the environment, carried wheels, caches, an earlier run's MLflow store.
NOT_COPIED = {".git", ".venv", ".whl", ".gl", "__pycache__", ".pytest_cache", ".ruff_cache", "mlflow.db", "mlruns",
              "mlartifacts"}  # fmt: skip
NOT_COPIED_PATHS = {".dvc/cache", ".dvc/tmp"}


def checkout_files() -> list[str]:
    """This checkout's tracked and untracked (not ignored) files: git's list, else a walk that skips ``NOT_COPIED``."""
    if GIT is not None:
        listed = subprocess.run([GIT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True)  # fmt: skip
        if listed.returncode == 0:
            return [rel for rel in listed.stdout.decode().split("\0") if rel and (ROOT / rel).is_file()]
    files = []
    for folder, dirs, names in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if d not in NOT_COPIED and (rel / d).as_posix() not in NOT_COPIED_PATHS]
        files += [(rel / name).as_posix() for name in names if name not in NOT_COPIED]
    return files


def copy_checkout(dest: Path) -> Path:
    """This checkout's files in a new git repository at ``dest``; without git, a DVC repository without SCM."""
    for rel in checkout_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    if GIT is None:  # DVC runs without git (core.no_scm); petpipe's git tags stay empty
        (dest / ".dvc" / "config.local").write_text("[core]\n    no_scm = true\n")
        return dest
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "lesson pipeline"]):
        subprocess.run([GIT, *command], cwd=dest, check=True, capture_output=True)
    return dest


def checkout(rev: str, dest: Path) -> Path:
    """``rev`` of this repository at ``dest``; ``WORKTREE``: this checkout as it is on disk."""
    if rev == WORKTREE:
        dest.mkdir(parents=True)
        return copy_checkout(dest)
    # Resolved here: a clone of a git worktree has the main checkout's HEAD, not this one's.
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True, check=True)
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "-q", commit.stdout.strip()], check=True)
    return dest


def lesson_params(repo: Path, variant: Variant, *, arch: str | None = None, precision: str | None = None) -> dict:
    """The repository's own pets profile with the generated archive, random weights and the variant's sizes."""
    params = yaml.safe_load((repo / "profiles/pets.yaml").read_text())
    params["data"].update(url=ARCHIVE_NAME, sha256=None, md5=None, size=None)
    params["train"]["weights"] = "none"
    params["train"]["store_on_device"] = "auto"  # the GPU check exercises the device store where it fits
    for section, values in variant.params.items():
        params[section].update(values)
    if arch:
        params["train"]["arch"] = arch
    if precision:
        params["precision"] = precision
    return params


def stage_seconds(repo: Path) -> dict[str, float]:
    """The newest ``<stage>_seconds`` of each stage on a parent run in the repository's MLflow store (one
    `dvc repro` per stage makes one execution per stage; repeated runs log newer values)."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        rows = db.execute(
            "SELECT key, value FROM metrics WHERE key LIKE '%\\_seconds' ESCAPE '\\' ORDER BY timestamp"
        ).fetchall()
    return {key.removesuffix("_seconds"): value for key, value in rows}


def fixed_cost(repo: Path, stage: str) -> dict:
    """The stage's own record of its start-up, work and teardown seconds and phases (metrics/timing/<stage>.json)."""
    path = repo / "metrics" / "timing" / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def images_per_s(repo: Path, stage: str) -> float | None:
    path = repo / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()).get("train_images_per_s") if path.exists() else None


def epoch_seconds(repo: Path, stage: str) -> float:
    """The training and validation passes of the stage's epochs: the sum of its curves' ``epoch_seconds``."""
    path = repo / CURVES[stage] if stage in CURVES else None
    if path is None or not path.exists():
        return 0.0
    with open(path, newline="") as f:
        return sum(float(row["epoch_seconds"]) for row in csv.DictReader(f))


def disk_bytes(root: Path) -> int:
    """Allocated bytes of every file under ``root`` (.git left out: the runs add nothing there), each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != ".git":
                        stack.append(Path(entry.path))
                    continue
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def stage_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PETPIPE_WARM", "0")  # cold stage processes: what DVC users get, and what old revisions compare to
    return env


def run_stages(repo: Path) -> list[dict]:
    """One `dvc repro --single-item` per stage of the repository's dvc.yaml; a row of numbers per stage."""
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    env = stage_env()
    rows = []
    disk = disk_bytes(repo)
    for stage in stages:
        started = time.perf_counter()
        done = subprocess.run(
            ["dvc", "repro", "--single-item", stage], cwd=repo, env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"stage {stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        after = disk_bytes(repo)
        rows.append({"stage": stage, "wall_s": wall, "disk_bytes": after - disk})
        disk = after
        print(f"{stage}: {wall:.1f} s, {rows[-1]['disk_bytes'] / 1e6:+.1f} MB on disk", flush=True)
    tracked = stage_seconds(repo)
    for row in rows:
        stage = row["stage"]
        timing = fixed_cost(repo, stage)
        row["work_s"] = tracked.get(stage)
        row["images_per_s"] = images_per_s(repo, stage)
        row["startup_s"], row["teardown_s"] = timing.get("startup_seconds"), timing.get("teardown_seconds")
        row["phases"] = timing.get("phases") or {}
        row["epochs_s"] = epoch_seconds(repo, stage)
        row["non_epoch_s"] = row["wall_s"] - row["epochs_s"]
    return rows


def totals(rows: list[dict]) -> dict:
    return {key: sum(r[key] for r in rows) for key in ("wall_s", "epochs_s", "non_epoch_s", "disk_bytes")}


def cell(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def phases_cell(phases: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items()) or "-"


def table(rows: list[dict], title: str) -> str:
    header = ("| stage | wall s | tracked work s | start-up s | teardown s | phases s | epochs s | non-epoch s "
              "| disk MB | train images/s |")  # fmt: skip
    lines = [f"### {title}", "", header, "|" + " --- |" * header.count(" | ") + " --- |"]
    lines += [
        f"| {r['stage']} | {cell(r['wall_s'])} | {cell(r['work_s'])} | {cell(r['startup_s'])} | "
        f"{cell(r['teardown_s'])} | {phases_cell(r['phases'])} | {cell(r['epochs_s'])} | {cell(r['non_epoch_s'])} | "
        f"{cell(r['disk_bytes'] / 1e6)} | {cell(r['images_per_s'])} |"
        for r in rows
    ]
    total = totals(rows)
    after_fetch = sum(r["wall_s"] for r in rows if r["stage"] != "fetch")
    lines += [
        f"| all stages | {cell(total['wall_s'])} | | | | | {cell(total['epochs_s'])} | {cell(total['non_epoch_s'])} "
        f"| {cell(total['disk_bytes'] / 1e6)} | |",
        "",
        f"Total wall time {total['wall_s']:.1f} s (without fetch {after_fetch:.1f} s); inside epochs "
        f"{total['epochs_s']:.1f} s; non-epoch {total['non_epoch_s']:.1f} s; "
        f"disk written {total['disk_bytes'] / 1e6:.1f} MB.",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def ratio(new: float | None, old: float | None) -> str:
    return "-" if new is None or not old else f"{new / old:.2f}"


def comparison(revs: dict[str, str], runs: dict[str, list[list[dict]]]) -> str:
    """Medians over the rounds per stage, the first revision (old) against the second (new)."""
    (old, old_rev), (new, new_rev) = revs.items()
    per_stage = {name: {} for name in revs}
    for name in revs:
        for rows in runs[name]:
            for row in [*rows, {"stage": "all stages", **totals(rows)}]:
                per_stage[name].setdefault(row["stage"], []).append(row)
    stages = list(dict.fromkeys([*per_stage[old], *per_stage[new]]))
    stages.append(stages.pop(stages.index("all stages")))
    header = (f"| stage | wall s {old_rev} | wall s {new_rev} | non-epoch s {old_rev} | non-epoch s {new_rev} "
              f"| non-epoch new/old | disk MB {old_rev} | disk MB {new_rev} | disk new/old |")  # fmt: skip
    lines = [f"### {new_rev} against {old_rev}: medians over {len(runs[old])} alternating rounds", "", header,
             "|" + " --- |" * 9]  # fmt: skip
    for stage in stages:
        m = {
            (name, key): median([r.get(key) for r in per_stage[name].get(stage, [])])
            for name in revs
            for key in ("wall_s", "non_epoch_s", "disk_bytes")
        }
        mb = {name: None if m[name, "disk_bytes"] is None else m[name, "disk_bytes"] / 1e6 for name in revs}
        lines.append(
            f"| {stage} | {cell(m[old, 'wall_s'])} | {cell(m[new, 'wall_s'])} | {cell(m[old, 'non_epoch_s'])} | "
            f"{cell(m[new, 'non_epoch_s'])} | {ratio(m[new, 'non_epoch_s'], m[old, 'non_epoch_s'])} | "
            f"{cell(mb[old])} | {cell(mb[new])} | {ratio(mb[new], mb[old])} |"
        )
    return "\n".join(lines) + "\n"


def lesson_run(pristine: Path, archive: Path, run_dir: Path, variant: Variant, **overrides: str | None) -> list[dict]:
    """A fresh copy of ``pristine`` at ``run_dir`` (deleted afterwards: a full run leaves gigabytes), the lesson."""
    shutil.copytree(pristine, run_dir, symlinks=True)
    try:
        try:
            os.link(archive, run_dir / ARCHIVE_NAME)
        except OSError:
            shutil.copy2(archive, run_dir / ARCHIVE_NAME)
        params = lesson_params(run_dir, variant, **overrides)
        (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        # The previous run's writes (gigabytes for e1d50d3's raw store) reach the disk now, not during this run's
        # first stages: each run pays for its own writeback only.
        os.sync()
        return run_stages(run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--images", type=int, help="generated JPEGs (default: the variant's)")
    parser.add_argument("--classes", type=int, help="breeds (default: the variant's)")
    parser.add_argument("--cpu", action="store_true", help="resnet18 at 32 px, 1 + 1 epochs, the lesson's data")
    parser.add_argument("--dry-run", action="store_true", help="tiny: seconds (with --cpu: 148 photo-sized images)")
    parser.add_argument("--revisions", nargs="+", default=[WORKTREE], metavar="REV",
                        help="one or two revisions (git revs, or WORKTREE: this checkout on disk); with two, the "
                             "first is the old one of the comparison (default: WORKTREE)")  # fmt: skip
    parser.add_argument("--checkout", metavar="REV", help="run this revision alone (= --revisions REV)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each revision, alternating (default 1)")
    parser.add_argument("--archive", type=Path, help="folder that keeps the generated archive (default: scratch)")
    parser.add_argument("--arch", help="train.arch instead of the variant's (a torchvision name or timm/<name>)")
    parser.add_argument("--precision", help="precision instead of the profile's auto (e.g. bf16)")
    parser.add_argument("--out", type=Path, help="append the markdown tables to this file")
    parser.add_argument("--json", type=Path, help="write every run's rows to this JSON file")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` still removes the scratch repositories
    revisions = [args.checkout] if args.checkout else args.revisions
    if len(revisions) > 2:
        parser.error(f"--revisions takes one or two revisions, got {len(revisions)}")
    base = VARIANTS[{(False, False): "lesson", (True, False): "cpu", (False, True): "dry", (True, True): "cpu-dry"}[
        args.cpu, args.dry_run]]  # fmt: skip
    variant = Variant(base.name, args.images or base.images, args.classes or base.classes, base.width, base.height,
                      base.params)  # fmt: skip
    revs = {f"{i}": rev for i, rev in enumerate(revisions)}
    runs: dict[str, list[list[dict]]] = {name: [] for name in revs}
    with tempfile.TemporaryDirectory(prefix="petpipe-lesson-") as tmp:
        scratch = Path(tmp)
        archive = lesson_archive(args.archive or scratch / "archive", variant)
        pristine = {name: checkout(rev, scratch / f"rev{name}") for name, rev in revs.items()}
        for round_ in range(args.rounds):
            for name, rev in revs.items():
                print(f"round {round_ + 1}, {rev}:", flush=True)
                rows = lesson_run(pristine[name], archive, scratch / "run", variant, arch=args.arch,
                                  precision=args.precision)  # fmt: skip
                runs[name].append(rows)
    warm = "warm" if os.environ.get("PETPIPE_WARM", "0") != "0" else "cold"
    title = (f"Lesson-1 pipeline ({variant.name}), {variant.images} generated images, {variant.classes} classes, "
             f"{warm} stage processes" + (f", {args.arch}" if args.arch else "")
             + (f", {args.precision}" if args.precision else ""))  # fmt: skip
    machine = f"{os.cpu_count()} cores, python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}"
    report = [f"## {title} ({machine})", ""]
    for name, rev in revs.items():
        for i, rows in enumerate(runs[name]):
            report.append(table(rows, f"{rev}, round {i + 1}"))
    if len(revs) == 2:
        report.append(comparison(revs, runs))
    text = "\n".join(report)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"title": title, "revisions": revs, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
