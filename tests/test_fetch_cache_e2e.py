"""Real `dvc repro fetch` and `dvc exp run --temp` in a copy of this project, against a real HTTP
server on 127.0.0.1: retries survive HTTP 503, and an experiment in a temporary workspace takes
the archive from the download cache instead of downloading it again. Only the fetch stage runs."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project, copy_store, stage_env, tar_bytes
from http_faults import FaultyServer

from petpipe.sources.download import cached_archive

pytestmark = pytest.mark.slow

ARCHIVE = "/datasets/tiny.tgz"


def run(cmd: list[str], repo, env) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def server():
    srv = FaultyServer()
    srv.files[ARCHIVE] = tar_bytes(
        {f"tiny/{split}/{c}/{i}.png": bytes([i]) * 64 for split in ("train", "valid") for c in "ab" for i in range(3)}
    )
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlflow_template, server):
    tmp = tmp_path_factory.mktemp("fetch-e2e")
    repo = copy_project(tmp / "repo")
    params = yaml.safe_load((ROOT / "profiles/digits.yaml").read_text())
    data = server.files[ARCHIVE]
    params["data"].update(url=server.url(ARCHIVE), sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.lock").unlink(missing_ok=True)  # this repository has run nothing yet
    copy_store(mlflow_template, repo / "mlflow.db")
    env = stage_env(PETPIPE_CACHE_DIR=str(tmp / "cache"))
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "fetch over http"]):
        run(cmd, repo, env)
    return repo, env


def test_repro_fetch_survives_http_503_twice(repo, server):
    path, env = repo
    server.plan(ARCHIVE, ("status", 503), ("status", 503))
    result = run(["dvc", "repro", "fetch"], path, env)
    assert server.requests(ARCHIVE) == [None, None, None]
    assert "HTTP 503 Service Unavailable; try 2 in 1 s" in result.stderr + result.stdout
    assert sorted(p.name for p in (path / "data/dataset/train").iterdir()) == ["a", "b"]
    cached = cached_archive(
        server.url(ARCHIVE), Path(env["PETPIPE_CACHE_DIR"])
    )  # the cache lives outside the workspace
    assert cached.read_bytes() == server.files[ARCHIVE] and not cached.is_relative_to(path)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "fetched"], path, env)


def test_temp_experiment_takes_the_archive_from_the_cache(repo, server):
    path, env = repo
    before = len(server.requests(ARCHIVE))
    assert before == 3, "runs after test_repro_fetch_survives_http_503_twice"
    result = run(["dvc", "exp", "run", "--temp", "-n", "caps", "-S", "data.max_members=5000", "fetch"], path, env)
    assert "Running stage 'fetch'" in result.stdout  # the stage ran in a temporary copy ...
    assert len(server.requests(ARCHIVE)) == before  # ... without a request to the server
