"""Experiments on the end-to-end repository (tests/e2e_repo.py: the pipeline built by real `make repro`, its store
empty): `dvc exp run`, plain and queued side by side, each an execution in the repository's sqlite MLflow store; and
the dataset through a DVC remote into a second clone."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from e2e_repo import built_repo, new_runs, pipeline_env, ran_stages, run, runs_by_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(request, tmp_path_factory, mlflow_template) -> Path:
    return built_repo(request, tmp_path_factory, mlflow_template)


def test_experiment_reruns_exactly_the_stages_that_read_the_param(repo):
    before = runs_by_stage(repo)
    result = run(["dvc", "exp", "run", "-n", "two-epochs", "-S", "finetune.epochs=2"], repo)
    assert ran_stages(result) == ["finetune", "report"]
    assert new_runs(repo, before) == {"finetune": 1, "report": 1}
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    names = {exp.get("name") for entry in shown for exp in entry.get("experiments") or []}
    assert "two-epochs" in names
    with sqlite3.connect(repo / "mlflow.db") as db:
        tags = db.execute(
            "SELECT t.value FROM tags t JOIN runs r ON t.run_uuid = r.run_uuid WHERE r.name = 'finetune' AND t.key = "
            "'dvc.exp_name'"
        ).fetchall()
    assert tags == [("two-epochs",)]


def queue_status(repo: Path) -> dict[str, str]:
    """`dvc queue status` (a table: task, name, created, status) as {experiment name: status}."""
    lines = run(["dvc", "queue", "status"], repo).stdout.splitlines()
    rows = [line.split() for line in lines[1:] if line.strip() and not line.startswith("Worker status")]
    return {row[1]: row[-1] for row in rows if len(row) >= 3}


def wait_for_the_queue(repo: Path, timeout: float = 420) -> dict[str, str]:
    """Poll `dvc queue status` until nothing is queued or running (or ``timeout`` seconds). Every 5 s: each poll is a
    DVC process, on the cores the experiments run on."""
    deadline = time.monotonic() + timeout
    while True:
        status = queue_status(repo)
        if not {"Queued", "Running"} & set(status.values()) or time.monotonic() > deadline:
            return status
        time.sleep(5)


def test_two_queued_experiments_side_by_side_are_two_executions_in_the_repository_store(repo):
    """`dvc queue start -j 2`: each experiment runs in its own temporary copy under .dvc/tmp, at the same
    time; each is one parent run with its own stage runs, all in the repo's store."""
    before = runs_by_stage(repo)
    with sqlite3.connect(repo / "mlflow.db") as db:
        old_parents = {
            r for (r,) in db.execute("SELECT run_uuid FROM tags WHERE key = 'petpipe.kind' AND value = 'pipeline'")
        }
    for name, epochs in (
        ("queued-a", 3),
        ("queued-b", 4),
    ):  # values no earlier test ran: DVC's run cache would restore those
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"finetune.epochs={epochs}"], repo)
    # The queue's workers outlive `dvc queue start`: their output goes to a file, not to pipes that start would be
    # waiting on until the last worker ends.
    with open(repo.parent / "queue.log", "w") as log:
        subprocess.run(
            ["dvc", "queue", "start", "-j", "2"],
            cwd=repo,
            env=pipeline_env(),
            stdout=log,
            stderr=log,
            timeout=120,
            check=True,
        )
    try:
        status = wait_for_the_queue(repo)
        failed = {
            name: run(["dvc", "queue", "logs", name], repo).stdout[-3000:]
            for name, s in status.items()
            if s != "Success"
        }
    finally:
        run(["dvc", "queue", "stop", "--kill"], repo)  # nothing may outlive the test, a failed or timed-out one either
    assert status == {"queued-a": "Success", "queued-b": "Success"}, (status, failed)
    assert new_runs(repo, before) == {"finetune": 2, "report": 2}
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    with sqlite3.connect(repo / "mlflow.db") as db:
        parents = {
            run_id: (name, start, end)
            for run_id, name, start, end in db.execute(
                "SELECT r.run_uuid, r.name, r.start_time, r.end_time FROM runs r JOIN tags t ON t.run_uuid = "
                "r.run_uuid "
                "WHERE t.key = 'petpipe.kind' AND t.value = 'pipeline'"
            )
            if run_id not in old_parents
        }
        children = {
            parent: sorted(
                n
                for (n,) in db.execute(
                    "SELECT r.name FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                    "WHERE t.key = 'mlflow.parentRunId' AND t.value = ?",
                    (parent,),
                )
            )
            for parent in parents
        }
        uris = [u for (u,) in db.execute("SELECT artifact_uri FROM runs WHERE name = 'finetune'")]
    assert sorted(name for name, _, _ in parents.values()) == [
        "queued-a",
        "queued-b",
    ]  # the parent is named after the experiment
    assert list(children.values()) == [["finetune", "report"]] * 2
    (_, start_a, end_a), (_, start_b, end_b) = parents.values()
    assert start_a < end_b and start_b < end_a, "the two experiments did not run side by side"
    assert all(u.startswith((repo / "mlartifacts").resolve().as_uri()) for u in uris), uris


def test_dataset_travels_through_a_dvc_remote(repo, tmp_path):
    """A second clone gets data/dataset from `dvc pull`, without the source archive."""
    run(["dvc", "remote", "add", "-f", "-d", "store", str(tmp_path / "remote")], repo)
    run(["dvc", "push", "fetch"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results and remote"], repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    (clone / "assets" / "tiny.tgz").unlink()  # the source is gone: only the remote can provide the data
    run(["dvc", "pull", "fetch"], clone)
    assert sorted(p.name for p in (clone / "data/dataset/train").iterdir()) == ["blue", "green", "red"]
    status = run(["dvc", "status", "fetch"], clone)
    assert "up to date" in status.stdout  # fetch would not run again on this machine
