"""Shared fixtures: tiny generated image datasets, archives, a local HTTP server, an MLflow server."""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 220)}


# The longest modules (seconds alone on 2 cores), started first: with --dist loadfile a module runs on one worker, and
# a long one handed out last would run alone at the end. test_e2e_experiments.py waits for the repository that
# test_e2e.py builds (~65 s), so it comes after test_executions.py. pyproject.toml turns off pytest-xdist's own
# order (most tests first), which would undo this one.
LONGEST_FIRST = (
    "test_e2e.py",  # ~135
    "test_executions.py",  # ~60
    "test_e2e_experiments.py",  # ~85
    "test_lesson_pipeline.py",  # ~60: benchmarks/lesson_pipeline.py --cpu --dry-run
    "test_resume.py",  # ~50
    "test_executions_outage.py",  # ~25
    "test_engine.py",  # ~20
    "test_distributed.py",  # ~20
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules of LONGEST_FIRST first, in that order; the others after them, as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's tests keep their order


def make_image(color: tuple[int, int, int], seed: int, size: int = 16) -> Image.Image:
    """A noisy square of one colour: trivially learnable, different pixels every time."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def write_folder_dataset(root: Path, per_class: int = 8, valid_per_class: int = 3, suffix: str = ".png") -> Path:
    """train/<class>/<i>.png and valid/<class>/<i>.png for three colour classes."""
    seed = 0
    for name, color in COLORS.items():
        for split, count in (("train", per_class), ("valid", valid_per_class)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                make_image(color, seed).save(folder / f"{i}{suffix}")
    return root


def write_named_dataset(root: Path, per_class: int = 6) -> Path:
    """Pets-style flat folder: images/<Class_name>_<n>.jpg."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for k, (name, color) in enumerate(COLORS.items()):
        label = name.capitalize() + ("_cat" if k % 2 else "")
        for i in range(per_class):
            make_image(color, 100 * k + i).save(root / "images" / f"{label}_{i + 1}.jpg")
    return root


def make_tarball(folder: Path, out: Path, top: str = "dataset") -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=top)
    return out


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return write_folder_dataset(tmp_path / "ds")


def folder_table(root: Path):
    """The labels table of a folder dataset (train/ and valid/ folders), as the labels stage makes it."""
    from petpipe.data.labels import make_table

    return make_table(
        root,
        rule="folder",
        images_dir=".",
        pattern=None,
        match_on="name",
        csv_name=None,
        valid_pct=0.2,
        seed=0,
        split="folder",
    )


def write_presized(root: Path, out_dir: Path, size: int = 24) -> Path:
    """The presized store of a folder dataset (train/ and valid/ folders), as the presize stage writes it."""
    from petpipe.data.presize import write_store

    table = folder_table(root)
    items = table.indexed()
    write_store(root, items, out_dir, size=size, workers=1, classes=table.classes, progress=False)
    return out_dir


@pytest.fixture(scope="session")
def presized_store(tmp_path_factory) -> Path:
    """A presized store of three colour classes: 12 train and 4 valid images each, 16 px images stored at 24 px."""
    tmp = tmp_path_factory.mktemp("presized")
    return write_presized(write_folder_dataset(tmp / "ds", per_class=12, valid_per_class=4), tmp / "store")


@pytest.fixture
def dataset_tarball(tmp_path: Path) -> Path:
    return make_tarball(write_folder_dataset(tmp_path / "src"), tmp_path / "tiny.tgz")


@pytest.fixture(scope="session", autouse=True)
def download_cache(tmp_path_factory) -> Path:
    """Downloads go to a temporary cache, never to the user's ~/.cache/petpipe (stage subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("download-cache")
        patch.setenv("PETPIPE_CACHE_DIR", str(path))
        yield path


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (resumable downloads), quiet logs."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        path = Path(self.translate_path(self.path))
        header = self.headers.get("Range")
        if not header or not path.is_file():
            return super().send_head()
        start = int(header.removeprefix("bytes=").split("-")[0])
        size = path.stat().st_size
        if start >= size:
            self.send_error(416)
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        return f


@pytest.fixture
def http_server(tmp_path: Path):
    """Serves tmp_path/www on 127.0.0.1; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A download cache of this test's own ($PETPIPE_CACHE_DIR)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("PETPIPE_CACHE_DIR", str(path))
    return path


@pytest.fixture
def server():
    """A local HTTP server that misbehaves on cue (``http_faults.FaultyServer``)."""
    from http_faults import FaultyServer

    srv = FaultyServer()
    yield srv
    srv.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """One freshly created and migrated MLflow sqlite store per test run (creating one takes ~15 s
    here); tests that need a store of their own start from a copy of it."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables and runs the migrations
    return path


def copy_store(template: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, dest)
    return dest


@pytest.fixture
def mlflow_store(mlflow_template, tmp_path) -> str:
    """Tracking URI of a private, already migrated sqlite store whose ``petpipe`` experiment keeps
    its artifacts beside it (not in ./mlruns of the working directory)."""
    from mlflow.tracking import MlflowClient

    home = tmp_path / "mlflow-store"
    uri = f"sqlite:///{copy_store(mlflow_template, home / 'mlflow.db')}"
    MlflowClient(uri).create_experiment("petpipe", artifact_location=(home / "artifacts").as_uri())
    return uri


def start_mlflow_server(home: Path) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1 over ``home``'s mlflow.db, in a process group of its own
    (it starts uvicorn, a job runner and queue consumers: ``stop_mlflow_server`` ends them all)."""
    port = free_port()
    log = open(home / "server.log", "a")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination",
            str(home / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=home,
        start_new_session=True,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_mlflow_server(proc)
            raise RuntimeError(f"mlflow server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    """Stop the server and every process it started (SIGTERM to the group, SIGKILL after 10 s)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone of the group left?
            except ProcessLookupError:
                proc.poll()
                return
            proc.poll()  # reap the leader
            time.sleep(0.1)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, mlflow_template):
    """A real `mlflow server` process on 127.0.0.1 with its own sqlite store and artifact folder."""
    home = tmp_path_factory.mktemp("mlflow-server")
    copy_store(mlflow_template, home / "mlflow.db")
    proc, url = start_mlflow_server(home)
    try:
        yield url
    finally:
        stop_mlflow_server(proc)


def copy_project(dest: Path) -> Path:
    """The tracked files of this repository (plus unstaged edits) copied into ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    for rel in filter(None, files.stdout.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def stage_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: the venv first on PATH, no inherited MLflow/DVC settings or execution key, and
    nothing pytest changes per test (a warm stage server belongs to one environment: the module's tests share it)."""
    dropped = ("PETPIPE_EXECUTION", "PYTEST_CURRENT_TEST")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_")) and k not in dropped}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def write_params(path: Path, params: dict) -> str:
    """A params file for a stage's ``--params``; returns its path as a string."""
    path.write_text(yaml.safe_dump(params))
    return str(path)


def tar_bytes(entries: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()
