"""Where a model stage's start-up goes: its imports, package by package, and CUDA's initialisation.

On the 2-core CPU machine a model stage starts in ~4.4 s, 4.2 s of it imports (benchmarks/RESULTS.md); on the
H200 machine the same start-ups took 13.5-16.8 s, unexplained. This prints, for a GPU run to explain itself:

- the imports of a training stage (``--modules``) in a fresh interpreter under ``python -X importtime``, twice (the
  first may read the shared libraries from disk, the second finds them in the page cache): the wall seconds and
  the cumulative seconds of the heaviest packages (torch, torchvision, torch._dynamo, which torchvision.ops and
  every optimizer import, mlflow and its SQLAlchemy store, matplotlib, timm);
- in another fresh interpreter, after ``import torch``: ``torch.cuda.init()`` and the first CUDA tensor, where
  CUDA is present (a model stage pays them in its work, in ``make_runtime``).

    python benchmarks/import_cost.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A training stage's imports; the SQLAlchemy store is what MLflow imports when the stage opens its run (sqlite URI).
MODULES = (
    "petpipe.train.runner",
    "petpipe.train.model",
    "petpipe.tracking.runs",
    "mlflow.store.tracking.sqlalchemy_store",
)
HEAVY = (
    "torch",
    "torchvision",
    "torch._dynamo",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "sqlalchemy",
    "matplotlib",
    "timm",
    "pandas",
    "pydantic",
)
CUDA_PROBE = """
import time
started = time.perf_counter()
import torch
imported = time.perf_counter()
if not torch.cuda.is_available():
    print(f"import torch {imported - started:.2f} s; no CUDA")
else:
    torch.cuda.init()
    initialised = time.perf_counter()
    torch.ones(1, device="cuda").sum().item()
    print(
        f"import torch {imported - started:.2f} s; torch.cuda.init() {initialised - imported:.2f} s; first CUDA "
        f"tensor {time.perf_counter() - initialised:.2f} s ({torch.cuda.get_device_name(0)})"
    )
"""


def imports(importtime: str) -> list[tuple[str, float, bool]]:
    """``python -X importtime``'s stderr -> (module, cumulative seconds, imported at the top level), in its order."""
    rows = []
    for line in importtime.splitlines():
        fields = line.split("|")
        if line.startswith("import time:") and len(fields) == 3 and fields[1].strip().isdigit():
            name = fields[2]  # `-X importtime`: " name" at the top, 2 more spaces per level below
            rows.append((name.strip(), int(fields[1]) / 1e6, not name.startswith("  ")))
    return rows


def cumulative_seconds(importtime: str) -> dict[str, float]:
    """{module: cumulative seconds}, each module where it was first imported."""
    seconds: dict[str, float] = {}
    for name, cumulative, _ in imports(importtime):
        seconds.setdefault(name, cumulative)
    return seconds


def top_level_seconds(importtime: str) -> float:
    """The imports' total: the cumulative times of the modules imported at the top (not by another module)."""
    return sum(cumulative for _, cumulative, top in imports(importtime) if top)


def import_line(modules: tuple[str, ...]) -> str:
    """One fresh interpreter importing ``modules`` under ``-X importtime``: wall, imports, the heavy packages."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {', '.join(modules)}"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return f"importing {', '.join(modules)} failed: {done.stderr.strip().splitlines()[-1:]}"
    seconds = cumulative_seconds(done.stderr)
    heavy = ", ".join(f"{name} {seconds[name]:.2f}" for name in HEAVY if name in seconds)
    return f"wall {wall:.2f} s, imports {top_level_seconds(done.stderr):.2f} s ({heavy})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", default=list(MODULES), help="what to import (a training stage's)")
    args = parser.parse_args(argv)
    modules = tuple(args.modules)
    print(f"imports of {', '.join(modules)} (cumulative seconds):")
    for attempt in ("first", "again"):
        print(f"  {attempt}: {import_line(modules)}", flush=True)
    probe = subprocess.run([sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True, check=False)
    print(f"CUDA: {probe.stdout.strip() or probe.stderr.strip().splitlines()[-1:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
