"""Warm stage processes (petpipe.run.warm): a real server, real forks, real signals, a real squatter of another uid; a
small script stands in for a stage (tests/test_e2e.py runs the real pipeline warm and cold and compares)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from petpipe.run import clock as stage_clock
from petpipe.run import warm

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = f"""
import json, os, signal, sys, threading, time
sys.path.insert(0, {str(ROOT / "src")!r})
from pathlib import Path
from petpipe.run import clock as stage_clock
from petpipe.run import warm

if warm.CHILD_ENV not in os.environ:  # the process DVC started: warm if it can, else on (cold)
    code = warm.hand_off(Path(sys.argv[0]), sys.argv[1:], stage_clock.CLOCK.started)
    if code is not None:
        sys.exit(code)
mode, out = sys.argv[1], Path(sys.argv[2])
out.write_text(json.dumps({{
    "warm": warm.CHILD_ENV in os.environ, "pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv,
    "answer": os.environ.get("ANSWER"), "big": len(os.environ.get("BIG", "")), "start": os.environ.get(
    stage_clock.START_ENV), "main": __name__, "file": __file__, "path": sys.path, "flags": list(sys.flags),
    "affinity": sorted(os.sched_getaffinity(0)), "umask": warm.umask(),
}}))
print("to the caller's stdout")
print("to the caller's stderr", file=sys.stderr)
if mode == "wait":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))
    time.sleep(60)
if mode == "sigterm":
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
if mode == "unclosed":  # what a process's exit does: flush a file left open, wait for a non-daemon thread
    left_open = open(str(out) + ".unclosed", "w")
    left_open.write("1234")
    threading.Thread(target=lambda: (time.sleep(0.5), Path(str(out) + ".thread").write_text("joined"))).start()
sys.exit(int(mode) if mode.isdigit() else 0)
"""
THREAD_STARTER = "import threading, time\nthreading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """The stand-in stage script, and an environment of its own: its own socket folder, so servers of its own."""
    folder = tmp_path_factory.mktemp("warm")
    script = folder / "stages" / "fake.py"
    script.parent.mkdir()
    script.write_text(SCRIPT)
    runtime = folder / "run"
    runtime.mkdir(mode=0o700)
    env = {
        **os.environ,
        **warm.THREAD_FREE_ENV,
        warm.SWITCH_ENV: "1",
        warm.IDLE_ENV: "60",
        warm.PRELOAD_ENV: "",  # fast servers; test_real_imports_leave_a_server_that_forks loads the real ones
        "XDG_RUNTIME_DIR": str(runtime),
        "ANSWER": "42",
    }
    env.pop(warm.CHILD_ENV, None)
    yield script, env
    stop_servers(runtime)


def stop_servers(runtime: Path) -> None:
    """SIGTERM to every server whose socket is in ``runtime`` (this module's own)."""
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"petpipe.run.warm" in command and any(str(runtime).encode() in part for part in command):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGTERM)


def socket_of(script: Path, env: dict[str, str], cwd: Path, **popen) -> Path:
    """The socket the stand-in's caller uses: computed by a script beside it (the same search path and context)."""
    beside = script.with_name("socket_of.py")
    beside.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); from pathlib import Path\n"
        "from petpipe.run import warm\n"
        f"print(warm.socket_path(Path({str(script)!r})))\n"
    )
    done = subprocess.run([sys.executable, str(beside)], env=env, cwd=cwd, capture_output=True, text=True, **popen)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def run_stage(script: Path, mode: str, out: Path, env: dict[str, str], **popen) -> subprocess.CompletedProcess:
    popen.setdefault("cwd", script.parents[1])
    command = [sys.executable, "stages/fake.py", mode, str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, **popen)


def warm_run(script: Path, mode: str, out: Path, env: dict[str, str], **popen) -> subprocess.CompletedProcess:
    """A run of the stand-in in a forked process: the first run starts the server (and runs cold), then it listens."""
    path = socket_of(script, env, popen.get("cwd", script.parents[1]), **{k: v for k, v in popen.items() if k != "cwd"})
    if not path.exists():
        run_stage(script, "0", out.with_name("starter.json"), env, **popen)
        assert wait_for(path.exists, 120), f"no server listens on {path}"
    done = run_stage(script, mode, out, env, **popen)
    assert out.exists() and json.loads(out.read_text())["warm"], done.stderr
    return done


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="warm stage processes are Linux only")


def test_the_stage_runs_forked_as_the_caller_would_run_it(stage, tmp_path):
    script, env = stage
    cold = run_stage(script, "7", tmp_path / "cold.json", {**env, warm.SWITCH_ENV: "0"})
    done = warm_run(script, "7", tmp_path / "warm.json", env)
    seen, reference = json.loads((tmp_path / "warm.json").read_text()), json.loads((tmp_path / "cold.json").read_text())
    assert done.returncode == cold.returncode == 7, done.stderr
    assert done.stdout == cold.stdout == "to the caller's stdout\n" and done.stderr == cold.stderr
    assert seen["pid"] != reference["pid"] and seen["answer"] == "42" and seen["main"] == "__main__"
    for key in ("cwd", "file", "path", "flags", "affinity", "umask"):
        assert seen[key] == reference[key], key
    assert seen["argv"] == ["stages/fake.py", "7", str(tmp_path / "warm.json")]
    assert time.time() - 200 < float(seen["start"]) < time.time()  # the caller's start, for the stage clock


def test_the_real_imports_leave_a_server_that_forks(stage, tmp_path):
    """PRELOAD (torch, MLflow ...) with THREAD_FREE_ENV: one thread, no CUDA context, so the server forks."""
    script, env = stage
    env = {k: v for k, v in env.items() if k != warm.PRELOAD_ENV}
    assert warm_run(script, "0", tmp_path / "seen.json", env).returncode == 0


def test_a_server_whose_imports_started_a_thread_runs_every_stage_cold(stage, tmp_path):
    script, env = stage
    modules = tmp_path / "modules"  # a folder of its own: a new file in a folder on the path is another server
    modules.mkdir()
    (modules / "starts_a_thread.py").write_text(THREAD_STARTER)
    env = {**env, warm.PRELOAD_ENV: "starts_a_thread", "PYTHONPATH": str(modules)}
    path = socket_of(script, env, script.parents[1])
    run_stage(script, "0", tmp_path / "starter.json", env)
    assert wait_for(path.exists, 60)
    done = run_stage(script, "0", tmp_path / "seen.json", env)
    assert done.returncode == 0 and not json.loads((tmp_path / "seen.json").read_text())["warm"]
    assert "its imports started threads" in done.stderr and "this stage runs cold" in done.stderr


def waiting_stage(script: Path, env: dict[str, str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A server up (one warm run first), then a caller whose forked stage waits until signalled; and the file where
    the stage has written what it saw (its pid)."""
    warm_run(script, "0", tmp_path / "ready.json", env)
    out = tmp_path / "seen.json"
    caller = subprocess.Popen(
        [sys.executable, str(script), "wait", str(out)], env=env, stdout=subprocess.DEVNULL, cwd=script.parents[1]
    )
    assert wait_for(lambda: out.exists() and out.stat().st_size > 0, 60)
    return caller, out


def test_sigterm_reaches_the_stage_and_its_exit_status_comes_back(stage, tmp_path):
    script, env = stage
    caller, out = waiting_stage(script, env, tmp_path)
    caller.send_signal(signal.SIGTERM)
    assert caller.wait(timeout=30) == 42  # the stage's own SIGTERM handler ran


def test_a_stage_killed_by_a_signal_exits_128_plus_n(stage, tmp_path):
    script, env = stage
    cold = run_stage(script, "sigterm", tmp_path / "cold.json", {**env, warm.SWITCH_ENV: "0"})
    assert cold.returncode == -signal.SIGTERM
    assert warm_run(script, "sigterm", tmp_path / "seen.json", env).returncode == 128 + signal.SIGTERM


def test_a_stage_exits_as_a_process_does(stage, tmp_path):
    """An unclosed file is flushed, a non-daemon thread is joined, and the process is gone when the caller exits."""
    script, env = stage
    out = tmp_path / "seen.json"
    assert warm_run(script, "unclosed", out, env).returncode == 0
    assert Path(f"{out}.unclosed").read_text() == "1234" and Path(f"{out}.thread").read_text() == "joined"
    assert not pid_alive(json.loads(out.read_text())["pid"])


def test_a_killed_caller_takes_the_stage_with_it(stage, tmp_path):
    """SIGKILL of the script DVC started (no chance to forward anything): the forked stage must not live on."""
    script, env = stage
    caller, out = waiting_stage(script, env, tmp_path)
    forked = json.loads(out.read_text())["pid"]
    assert pid_alive(forked) and forked != caller.pid
    caller.kill()
    caller.wait(timeout=10)
    assert wait_for(lambda: not pid_alive(forked), 10)


def test_a_100_kb_variable_reaches_the_stage_whole(stage, tmp_path):
    script, env = stage
    env = {**env, "BIG": "x" * 100_000}  # more than one recvmsg returns
    warm_run(script, "0", tmp_path / "seen.json", env)
    assert json.loads((tmp_path / "seen.json").read_text())["big"] == 100_000


def test_the_stage_has_the_callers_affinity_and_umask(stage, tmp_path):
    script, env = stage
    cpus = sorted(os.sched_getaffinity(0))[:1]

    def narrowed() -> None:  # in the caller (and the server it starts), as a user's taskset and umask would
        os.sched_setaffinity(0, cpus)
        os.umask(0o027)

    warm_run(script, "0", tmp_path / "seen.json", env, preexec_fn=narrowed)
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["affinity"] == cpus and seen["umask"] == 0o027


@pytest.fixture
def short_runtime():
    """A 0700 folder with a short path for XDG_RUNTIME_DIR: a socket path must fit in 107 bytes, and pytest's
    tmp_path (worker, test name) can be longer than that."""
    folder = Path(tempfile.mkdtemp(prefix="pw-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_another_context_or_environment_is_another_server_but_not_another_stage(monkeypatch, short_runtime):
    tmp_path = short_runtime
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    tmp_path.chmod(0o700)
    script = ROOT / "stages" / "labels.py"
    path = warm.socket_path(script)
    assert path.parent == tmp_path / "petpipe-warm" and path.suffix == ".sock"
    monkeypatch.setenv("DVC_STAGE", "labels")  # DVC's per-stage variables reach the stage, not the server's name
    monkeypatch.setenv(stage_clock.START_ENV, "1.0")
    assert warm.socket_path(script) == path
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # torch reads it when imported: the server's modules would differ
    assert warm.socket_path(script) != path
    monkeypatch.delenv("OMP_NUM_THREADS")
    previous = os.umask(0o077)
    try:
        assert warm.socket_path(script) != path
    finally:
        os.umask(previous)
    monkeypatch.chdir(tmp_path)  # another folder: its own matplotlibrc, say
    assert warm.socket_path(script) != path


def test_a_socket_folder_others_could_enter_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    tmp_path.chmod(0o700)
    (tmp_path / "petpipe-warm").mkdir(mode=0o755)
    (tmp_path / "petpipe-warm").chmod(0o755)
    with pytest.raises(OSError, match=r"petpipe-warm has mode 755: other users may enter it \(0700 expected\)"):
        warm.socket_folder()
    (tmp_path / "petpipe-warm").rmdir()
    (tmp_path / "petpipe-warm").symlink_to(tmp_path)
    with pytest.raises(OSError, match="is not a folder"):
        warm.socket_folder()
    (tmp_path / "petpipe-warm").unlink()
    assert warm.socket_folder() == tmp_path / "petpipe-warm"  # created, 0700
    if os.getuid() == 0:
        os.chown(tmp_path / "petpipe-warm", 65534, 65534)
        with pytest.raises(OSError, match="belongs to uid 65534, not to this user"):
            warm.socket_folder()


@pytest.mark.skipif(os.getuid() != 0, reason="a squatter of another uid needs root to setuid a child (CI runs as root)")
def test_a_squatter_of_another_uid_gets_nothing_and_the_stage_runs(stage, tmp_path):
    """Another user cannot even create a socket in the folder; and a socket there that another uid serves (only root
    could place it) gets no request, no environment, no file descriptors: the stage runs cold."""
    script, env = stage
    env = {**env, "SECRET": "not for the squatter"}
    path = socket_of(script, env, script.parents[1])
    reading, writing = os.pipe()  # the squatter's report (it cannot enter pytest's folders)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))  # root puts it there; the squatter listens, so SO_PEERCRED names the squatter
    squatter = os.fork()
    if squatter == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                socket.socket(socket.AF_UNIX).bind(str(path.with_name("mine.sock")))
                created = True
            except PermissionError:
                created = False
            listener.listen(1)
            listener.settimeout(30)
            connection, _ = listener.accept()
            connection.settimeout(5)
            received, fds = b"", []
            try:
                while chunk := socket.recv_fds(connection, 1 << 16, 3):
                    if not chunk[0]:
                        break
                    received += chunk[0]
                    fds += chunk[1]
            except OSError:
                pass
            os.write(writing, json.dumps({"created": created, "received": len(received), "fds": len(fds)}).encode())
        except BaseException as err:
            os.write(writing, json.dumps({"error": repr(err)}).encode())
        finally:
            os._exit(0)
    listener.close()
    os.close(writing)
    try:
        done = run_stage(script, "0", tmp_path / "seen.json", env)
    finally:
        os.waitpid(squatter, 0)
        path.unlink(missing_ok=True)
    with os.fdopen(reading, "rb") as report:
        seen = json.loads(report.read())
    assert seen == {"created": False, "received": 0, "fds": 0}
    assert done.returncode == 0 and not json.loads((tmp_path / "seen.json").read_text())["warm"]
    assert "is served by uid 65534, not by this user (uid 0)" in done.stderr


def test_the_server_leaves_when_idle(stage, tmp_path):
    script, env = stage
    env = {**env, warm.IDLE_ENV: "1"}  # another environment: a server of its own
    path = socket_of(script, env, script.parents[1])
    run_stage(script, "0", tmp_path / "seen.json", env)
    assert wait_for(path.exists, 60)
    assert wait_for(lambda: not path.exists(), 30)  # idle 1 s, then gone (the socket first)


def test_off_by_default_switched_off_or_inside_torchrun_the_stage_runs_cold(stage, tmp_path):
    script, env = stage
    warm_run(script, "0", tmp_path / "ready.json", env)  # a server is there to be used
    default = {k: v for k, v in env.items() if k != warm.SWITCH_ENV}
    for changed in (default, {**env, warm.SWITCH_ENV: "0"}, {**env, "LOCAL_RANK": "0"}):
        done = run_stage(script, "0", tmp_path / "x.json", changed)
        assert done.returncode == 0 and not json.loads((tmp_path / "x.json").read_text())["warm"]
        assert "petpipe.run.warm" not in done.stderr


def test_the_execution_variable_is_lineages():
    from petpipe.run import lineage

    assert warm.EXECUTION_ENV == lineage.EXECUTION_ENV
