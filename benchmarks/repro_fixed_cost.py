"""What a stage costs besides its work: `dvc repro -f` of two revisions in alternating runs, per stage.

Each revision is cloned into a scratch folder (``WORKTREE`` copies this checkout's tracked and untracked
files instead, uncommitted changes included) and reproduced with its own params.yaml (the digits default
unless ``--params`` names another file for both). The runs alternate A, B, A, B, ... on the same machine, so
both see the same load. Every stage command starts ``python``, which resolves to a shim that logs the
process's start and end, so per stage it prints:

- wall:     the stage process, start to exit (the shim's clock)
- tracked:  ``<stage>_seconds`` on the execution's MLflow parent run (the stage run's own span: store set-up
            and logging included; choose_lr has no run)
- fixed:    wall minus the stage's work, where the stage records it (``work_seconds`` in
            ``metrics/timing/<stage>.json``, with ``startup_seconds`` and ``teardown_seconds``), else wall minus
            tracked

and per run the total wall of `dvc repro -f`, its sum of stage walls (the rest is DVC's own work: hashing,
the lock file, the cache) and the final accuracy (the same for both when the change is speed only).

    .venv/bin/python benchmarks/repro_fixed_cost.py                         # cdffc74 against this checkout
    .venv/bin/python benchmarks/repro_fixed_cost.py --a HEAD~3 --b HEAD --rounds 5
    .venv/bin/python benchmarks/repro_fixed_cost.py --a HEAD --b HEAD --env-b PETPIPE_WARM=1   # cold against warm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_pipeline import checkout, fixed_cost, stage_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIM = """#!/usr/bin/env bash
started=$(date +%s.%N)
"{python}" "$@"
code=$?
echo "$1 $started $(date +%s.%N)" >> "{log}"
exit $code
"""


def shim_dir(folder: Path, log: Path) -> Path:
    """A folder whose ``python`` runs this interpreter and appends ``script start end`` to ``log``."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "python"
    shim.write_text(SHIM.format(python=sys.executable, log=log))
    shim.chmod(0o755)
    return folder


def accuracy(repo: Path) -> float | None:
    path = repo / "metrics" / "finetune.json"
    return json.loads(path.read_text()).get("accuracy") if path.exists() else None


def repro(repo: Path, shims: Path, log: Path, params: Path | None, extra_env: dict[str, str]) -> dict:
    """One `dvc repro -f` in ``repo`` (``extra_env`` added): its wall time and, per stage, wall, tracked and fixed
    seconds."""
    if params is not None:
        (repo / "params.yaml").write_text(params.read_text())
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(extra_env)
    env["PATH"] = f"{shims}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    started = time.perf_counter()
    done = subprocess.run(["dvc", "repro", "-f"], cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"dvc repro -f failed in {repo}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    tracked = stage_seconds(repo)
    stages = {}
    for line in log.read_text().splitlines():
        script, start, end = line.split()
        stage = Path(script).stem
        stage_wall = float(end) - float(start)
        recorded = fixed_cost(repo, stage)
        if recorded:
            fixed = stage_wall - recorded["work_seconds"]
        else:
            fixed = stage_wall - tracked.get(stage, 0.0)
        stages[stage] = {"wall": stage_wall, "tracked": tracked.get(stage), "fixed": fixed, **recorded}
    return {"wall": wall, "stages": stages, "accuracy": accuracy(repo)}


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(revs: dict[str, str], runs: dict[str, list[dict]]) -> str:
    lines = ["| run | " + " | ".join(f"{name} ({rev}) wall s" for name, rev in revs.items()) + " |"]
    lines.append("| --- |" + " --- |" * len(revs))
    for i in range(len(next(iter(runs.values())))):
        lines.append(f"| {i + 1} | " + " | ".join(f"{runs[name][i]['wall']:.1f}" for name in revs) + " |")
    medians = {name: median([r["wall"] for r in runs[name]]) for name in revs}
    lines.append("| median | " + " | ".join(f"{medians[name]:.1f}" for name in revs) + " |")
    a, b = medians.values()
    lines += ["", f"b/a of the median walls: {b / a:.3f} ({(1 - b / a) * 100:+.1f} % less time for b)", ""]
    for name in revs:
        accuracies = sorted({r["accuracy"] for r in runs[name]}, key=str)
        lines.append(f"accuracy of {name}: {', '.join(map(str, accuracies))}")
    lines += ["", "Per stage, medians over the runs (seconds):", ""]
    header = "| stage | " + " | ".join(f"{n} wall | {n} tracked | {n} fixed" for n in revs) + " |"
    lines += [header, "| --- |" + " --- | --- | --- |" * len(revs)]
    stages = list(runs[next(iter(revs))][0]["stages"])
    for stage in stages:
        cells = []
        for name in revs:
            per_run = [r["stages"].get(stage, {}) for r in runs[name]]
            cells += [cell(median([s.get(k) for s in per_run])) for k in ("wall", "tracked", "fixed")]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    totals = []
    for name in revs:
        walls = [sum(s["wall"] for s in r["stages"].values()) for r in runs[name]]
        fixed = [sum(s["fixed"] for s in r["stages"].values()) for r in runs[name]]
        totals += [cell(median(walls)), "", cell(median(fixed))]
    lines.append("| all stages | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def variables(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a dict; a pair without ``=`` is a usage error naming it."""
    for pair in pairs:
        if "=" not in pair:
            parser.error(f"--env-a/--env-b take KEY=VALUE, got {pair!r}")
    return dict(pair.split("=", 1) for pair in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="cdffc74", help="the baseline revision (default cdffc74)")
    parser.add_argument("--b", default="WORKTREE", help="the candidate: a revision, or WORKTREE (default)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating (default 3)")
    parser.add_argument("--params", type=Path, help="params file for both (default: each revision's params.yaml)")
    parser.add_argument(
        "--env-a", action="append", default=[], metavar="KEY=VALUE", help="a variable for a's runs only (repeatable)"
    )
    parser.add_argument("--env-b", action="append", default=[], metavar="KEY=VALUE", help="the same for b's runs")
    parser.add_argument("--json", type=Path, help="also write every run's numbers to this JSON file")
    args = parser.parse_args(argv)
    revs = {"a": args.a, "b": args.b}
    envs = {"a": variables(args.env_a, parser), "b": variables(args.env_b, parser)}
    runs: dict[str, list[dict]] = {name: [] for name in revs}
    with tempfile.TemporaryDirectory(prefix="petpipe-fixed-cost-") as tmp:
        scratch = Path(tmp)
        repos = {name: checkout(rev, scratch / name) for name, rev in revs.items()}
        log = scratch / "stages.log"
        shims = shim_dir(scratch / "shim", log)
        for round_ in range(args.rounds):
            for name in revs:
                result = repro(repos[name], shims, log, args.params, envs[name])
                runs[name].append(result)
                print(f"round {round_ + 1}, {name} ({revs[name]}): {result['wall']:.1f} s", flush=True)
    machine = f"{os.cpu_count()} cores, python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}"
    print(f"\n`dvc repro -f`, {args.rounds} alternating runs each ({machine})")
    for name in revs:
        print(f"{name}: {revs[name]} {' '.join(f'{k}={v}' for k, v in envs[name].items()) or '(environment as is)'}")
    print()
    print(report(revs, runs))
    if args.json:
        args.json.write_text(json.dumps({"revs": revs, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
