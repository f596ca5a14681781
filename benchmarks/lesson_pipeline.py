"""The whole lesson-1 pipeline on a generated Pets-sized dataset: wall time, tracked work time and images/s per stage.

A copy of this checkout (its tracked and untracked files) in a scratch folder runs every stage of dvc.yaml, one
`dvc repro --single-item` per stage so each is timed on its own, with the pets profile's epochs, LRs and sizes and
`train.weights: none` (no download). The dataset: ``--images`` JPEGs of 500x375 in ``--classes`` classes, named as
the Pets archive names them (``<breed>_<n>.jpg``), in a local tar archive. Each stage's tracked work time is the
``<stage>_seconds`` its MLflow run logs on the execution's parent run; images/s is the training stages' last-epoch
``train_images_per_s``.

    python benchmarks/lesson_pipeline.py                      # 7,390 images, 37 classes: the real lesson's size
    python benchmarks/lesson_pipeline.py --dry-run            # 60 tiny images, 32 px, one epoch each: seconds, CPU
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def jpeg(seed: int, width: int, height: int) -> bytes:
    """A photo-sized JPEG of smooth random colour (compresses like a photo, decodes at a photo's cost)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_archive(out: Path, *, images: int, classes: int, width: int, height: int) -> Path:
    """``images/<breed>_<n>.jpg`` for ``classes`` breeds, as one uncompressed tar."""
    names = [f"breed{c:02d}_{i}.jpg" for i in range(images // classes + 1) for c in range(classes)][:images]
    with ProcessPoolExecutor() as pool:
        blobs = list(pool.map(jpeg, range(len(names)), [width] * len(names), [height] * len(names), chunksize=64))
    with tarfile.open(out, "w") as tar:
        for name, blob in zip(names, blobs):
            info = tarfile.TarInfo(f"pets/images/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return out


def copy_checkout(dest: Path) -> Path:
    """This checkout's tracked and untracked (not ignored) files, in a new git repository at ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "lesson pipeline"]):
        subprocess.run(command, cwd=dest, check=True, capture_output=True)
    return dest


def lesson_params(archive: Path, repo: Path, dry_run: bool, arch: str | None) -> dict:
    """The pets profile with the generated archive and random weights (and tiny sizes for a dry run)."""
    params = yaml.safe_load((ROOT / "profiles/pets.yaml").read_text())
    params["data"].update(url=archive.relative_to(repo).as_posix(), sha256=None, md5=None, size=None)
    params["train"]["weights"] = "none"
    params["train"]["store_on_device"] = "auto"  # the GPU check exercises the device store where it fits
    if dry_run:
        params["presize"]["size"] = 48
        params["train"].update(arch="resnet18", size=32, batch_size=8)
        params["train_frozen"]["epochs"] = 1
        params["lr_find"]["num_it"] = 10
        params["finetune"]["epochs"] = 1
    if arch:
        params["train"]["arch"] = arch
    return params


def stage_seconds(repo: Path) -> dict[str, float]:
    """The newest ``<stage>_seconds`` of each stage on a parent run in the repository's MLflow store (one
    `dvc repro` per stage makes one execution per stage; repeated runs log newer values)."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        rows = db.execute(
            "SELECT key, value FROM metrics WHERE key LIKE '%\\_seconds' ESCAPE '\\' ORDER BY timestamp"
        ).fetchall()
    return {key.removesuffix("_seconds"): value for key, value in rows}


def fixed_cost(repo: Path, stage: str) -> dict[str, float]:
    """The stage's own record of its start-up and teardown seconds (metrics/timing/<stage>.json)."""
    path = repo / "metrics" / "timing" / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def images_per_s(repo: Path, stage: str) -> float | None:
    path = repo / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()).get("train_images_per_s") if path.exists() else None


def run_stages(repo: Path) -> list[dict]:
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    rows = []
    for stage in stages:
        started = time.perf_counter()
        done = subprocess.run(
            ["dvc", "repro", "--single-item", stage], cwd=repo, env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"stage {stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        rows.append({"stage": stage, "wall_s": wall})
        print(f"{stage}: {wall:.1f} s", flush=True)
    tracked = stage_seconds(repo)
    for row in rows:
        row["work_s"] = tracked.get(row["stage"])
        row["images_per_s"] = images_per_s(repo, row["stage"])
        timing = fixed_cost(repo, row["stage"])
        row["startup_s"], row["teardown_s"] = timing.get("startup_seconds"), timing.get("teardown_seconds")
    return rows


def table(rows: list[dict], title: str) -> str:
    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    header = "| stage | wall s | tracked work s | start-up s | teardown s | train images/s |"
    lines = [f"### {title}", "", header, "| --- | --- | --- | --- | --- | --- |"]
    lines += [
        f"| {r['stage']} | {cell(r['wall_s'])} | {cell(r['work_s'])} | {cell(r['startup_s'])} | "
        f"{cell(r['teardown_s'])} | {cell(r['images_per_s'])} |"
        for r in rows
    ]
    after_fetch = sum(r["wall_s"] for r in rows if r["stage"] != "fetch")
    lines += ["", f"Total wall time {sum(r['wall_s'] for r in rows):.1f} s; without fetch {after_fetch:.1f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=7390)
    parser.add_argument("--classes", type=int, default=37)
    parser.add_argument("--dry-run", action="store_true", help="60 small images, resnet18 at 32 px, one epoch each")
    parser.add_argument("--out", type=Path, help="append the markdown table to this file")
    parser.add_argument("--arch", help="train.arch instead of the profile's (a torchvision name or timm/<name>)")
    args = parser.parse_args(argv)
    images, classes, width, height = (60, 3, 64, 48) if args.dry_run else (args.images, args.classes, 500, 375)
    with tempfile.TemporaryDirectory(prefix="petpipe-lesson-") as tmp:
        repo = copy_checkout(Path(tmp) / "repo")
        started = time.perf_counter()
        archive = write_archive(repo / "pets.tar", images=images, classes=classes, width=width, height=height)
        print(
            f"dataset: {images} JPEGs of {width}x{height} in {classes} classes, {time.perf_counter() - started:.1f} s"
        )
        (repo / "params.yaml").write_text(
            yaml.safe_dump(lesson_params(archive, repo, args.dry_run, args.arch), sort_keys=False)
        )
        rows = run_stages(repo)
    title = f"Lesson-1 pipeline, {images} generated images, {classes} classes" + (" (dry run)" if args.dry_run else "")
    title += ", warm stage processes" if os.environ.get("PETPIPE_WARM", "1") != "0" else ", cold stage processes"
    title += f", {args.arch}" if args.arch else ""
    report = table(rows, title)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
