"""The repository of the end-to-end tests: a copy of this project in a temporary git repository, with a tiny
generated dataset, on which real `make repro PROFILE=tiny` has run; and the helpers that drive it.

tests/test_e2e.py builds it. The first `make repro` is a minute of the two modules' time, so
tests/test_e2e_experiments.py does not build its own: test_e2e.py publishes a copy of the repository as it stood
right after the build (with an empty store: see ``publish``) for the other module, which may run on another
pytest-xdist worker at the same time."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project, copy_store, make_tarball, stage_env, write_folder_dataset

from petpipe.run.warm import THREAD_FREE_ENV

STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
UNTRACKED = {"choose_lr"}  # bookkeeping stages without an MLflow run
TRACKED = [s for s in STAGES if s not in UNTRACKED]
BUILDER = "test_e2e.py"  # the module that builds the repository and publishes its copy
CONSUMER = "test_e2e_experiments.py"  # the module that takes the copy
PUBLISHED = "e2e-built"  # the copy, in the folder every worker's basetemp is in
WAIT_SECONDS = 900  # the build takes ~1 minute alone, several on a loaded machine


def tiny_params(repo: Path, archive: Path) -> dict:
    params = yaml.safe_load((ROOT / "profiles" / "digits.yaml").read_text())
    params["data"].update(
        url=archive.relative_to(repo).as_posix(), sha256=hashlib.sha256(archive.read_bytes()).hexdigest(), size=None
    )
    params["presize"]["size"] = 24
    # A timm backbone with random weights (no network here), through every stage, the logged models and the report.
    params["train"].update(
        arch="timm/resnet10t", size=16, batch_size=12, num_workers=1
    )  # one worker process: the multi-process loader path
    params["train_frozen"]["epochs"] = 1
    params["lr_find"].update(start_lr=1e-5, end_lr=10.0, num_it=30)
    params["finetune"].update(epochs=1, max_lr="auto")
    params["report"]["top_losses"] = 4
    return params


WARM_ENV = {"PETPIPE_WARM": "1", **THREAD_FREE_ENV}  # what a user sets to run the stages warm (README)
BUILD_LOG = "build.log"  # the build's `make repro` output, beside the repository


def pipeline_env(**extra: str) -> dict[str, str]:
    """The pipeline's environment: with warm stage processes (``PETPIPE_WARM=0`` in ``extra``: cold, nothing else
    changed, so that the outputs of both can be compared)."""
    return stage_env(**{**WARM_ENV, **extra})


def run(cmd: list[str], repo: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=repo, env=pipeline_env(**env), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def ran_stages(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")]


def runs_by_stage(repo: Path) -> dict[str, int]:
    """Stage runs (tagged petpipe.stage) per stage; parent runs of whole executions are not counted."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        rows = db.execute(
            "SELECT t.value, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = 'petpipe.stage'"
        ).fetchall()
    assert all(status == "FINISHED" for _, status in rows), rows
    out = dict.fromkeys(TRACKED, 0)
    for name, _ in rows:
        out[name] += 1
    return out


def new_runs(repo: Path, before: dict[str, int]) -> dict[str, int]:
    return {stage: n - before[stage] for stage, n in runs_by_stage(repo).items() if n != before[stage]}


def build(tmp: Path, mlflow_template: Path) -> Path:
    """``tmp``/repo: the project, the tiny profile, an empty migrated store; `make repro PROFILE=tiny`, committed."""
    repo = copy_project(tmp / "repo")
    archive = make_tarball(
        write_folder_dataset(tmp / "src", per_class=8, valid_per_class=3), repo / "assets" / "tiny.tgz", top="tiny"
    )
    (repo / "profiles" / "tiny.yaml").write_text(yaml.safe_dump(tiny_params(repo, archive), sort_keys=False))
    assert not (repo / "mlartifacts").exists()
    copy_store(mlflow_template, repo / "mlflow.db")  # an empty, migrated store: creating one costs ~15 s
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "tiny pipeline"], repo)
    # The documented entry point, with this test run's environment as its venv.
    # -o: never (re)install into the test run's own environment from this temporary copy.
    result = run(
        ["make", "-o", f"{Path(sys.prefix)}/bin/.installed", "repro", "PROFILE=tiny", f"VENV={Path(sys.prefix)}"], repo
    )
    assert ran_stages(result) == STAGES
    (tmp / BUILD_LOG).write_text(result.stdout)
    assert (repo / "params.yaml").read_text() == (repo / "profiles/tiny.yaml").read_text()
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "pipeline results"], repo)  # experiments start from a committed dvc.lock
    return repo


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder all pytest-xdist workers' basetemps are in (the basetemp itself without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def publish(repo: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> None:
    """A copy of the freshly built ``repo`` for test_e2e_experiments.py. Its store starts empty (a copy of the
    migrated template): the sqlite store holds absolute artifact locations, which would point into ``repo``."""
    target = shared_dir(tmp_path_factory) / PUBLISHED
    staging = target.with_name(f"{PUBLISHED}.{os.getpid()}")
    shutil.copytree(repo, staging, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    copy_store(mlflow_template, staging / "mlflow.db")
    try:
        staging.rename(target)  # atomic: the other module sees all of it or nothing
    except OSError:  # already published (two workers built it: --dist load): keep the first
        shutil.rmtree(staging)


def publish_failure(tmp_path_factory: pytest.TempPathFactory, error: BaseException) -> None:
    (shared_dir(tmp_path_factory) / f"{PUBLISHED}.failed").write_text(f"{type(error).__name__}: {error}")


def built_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Path:
    """The repository right after the build, with an empty store: test_e2e.py's published copy when that module is
    part of this session (it builds the repository anyway), else a build of its own."""
    if not any(item.path.name == BUILDER for item in request.session.items):
        repo = build(tmp_path_factory.mktemp("e2e"), mlflow_template)
        (repo / "mlflow.db").unlink()
        shutil.rmtree(repo / "mlartifacts")
        copy_store(mlflow_template, repo / "mlflow.db")
        return repo
    shared = shared_dir(tmp_path_factory)
    deadline = time.monotonic() + WAIT_SECONDS
    while not (shared / PUBLISHED).is_dir():
        failed = shared / f"{PUBLISHED}.failed"
        if failed.exists():
            pytest.fail(f"{BUILDER} could not build the repository: {failed.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{BUILDER} did not publish {shared / PUBLISHED} within {WAIT_SECONDS} s")
        time.sleep(1)
    return shared / PUBLISHED
