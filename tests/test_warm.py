"""Warm stage processes (petpipe.warm): a real server, real forks, real signals; a small script stands in for a
stage (the e2e pipeline runs the real stages through it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from petpipe import stage_clock, warm

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = f"""
import json, os, signal, sys, time
sys.path.insert(0, {str(ROOT / "src")!r})
from pathlib import Path
from petpipe import stage_clock, warm

if warm.CHILD_ENV not in os.environ:  # the process DVC started
    code = warm.hand_off(Path(__file__), sys.argv[1:], stage_clock.CLOCK.started)
    sys.exit(code if code is not None else 99)  # 99: it ran cold
mode, out = sys.argv[1], Path(sys.argv[2])
out.write_text(json.dumps({{
    "pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv[1:], "answer": os.environ.get("ANSWER"),
    "start": os.environ.get(stage_clock.START_ENV), "main": __name__, "file": __file__,
}}))
print("to the caller's stdout")
print("to the caller's stderr", file=sys.stderr)
if mode == "wait":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))
    time.sleep(60)
sys.exit(int(mode) if mode.isdigit() else 0)
"""


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """The stand-in stage script, and an environment of its own (so a server of its own)."""
    folder = tmp_path_factory.mktemp("warm")
    script = folder / "stages" / "fake.py"
    script.parent.mkdir()
    script.write_text(SCRIPT)
    env = {**os.environ, warm.IDLE_ENV: "60", "ANSWER": "42"}  # any change to it would mean another server
    env.pop(warm.SWITCH_ENV, None)
    yield script, env
    subprocess.run(["pkill", "-f", f"petpipe.warm serve {name_of(script, env)}"], check=False)


def name_of(script: Path, env: dict[str, str]) -> str:
    """The server name the stand-in computes: from a script beside it (the same search path)."""
    beside = script.with_name("name.py")
    beside.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); from pathlib import Path; from petpipe import warm\n"
        f"print(warm.server_name(Path({str(script)!r})).lstrip(chr(0)))\n"
    )
    return subprocess.run([sys.executable, str(beside)], env=env, capture_output=True, text=True).stdout.strip()


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
        time.sleep(0.1)
    return condition()


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="warm stage processes are Linux only")


def test_the_stage_runs_forked_as_the_caller_would_run_it(stage, tmp_path):
    script, env = stage
    out = tmp_path / "seen.json"
    for expected in (99, 7):  # the first starts the server and runs cold (99), the second is forked by it
        caller = subprocess.Popen(
            [sys.executable, "stages/fake.py", "7", str(out)],
            cwd=script.parents[1],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stdout, stderr = caller.communicate(timeout=180)
        assert caller.returncode == expected, stderr
        if expected == 99:
            continue
        assert stdout == "to the caller's stdout\n" and "to the caller's stderr" in stderr
        seen = json.loads(out.read_text())
        assert seen["pid"] != caller.pid and seen["cwd"] == str(
            script.parents[1]
        )  # another process, the caller's folder
        assert seen["argv"] == ["7", str(out)] and seen["answer"] == "42" and seen["main"] == "__main__"
        assert seen["file"] == str(script)
        assert time.time() - 200 < float(seen["start"]) < time.time()  # the caller's start, for the stage clock


def test_sigterm_reaches_the_stage_and_its_exit_status_comes_back(stage, tmp_path):
    script, env = stage
    out = tmp_path / "seen.json"
    caller = subprocess.Popen([sys.executable, str(script), "wait", str(out)], env=env, stdout=subprocess.DEVNULL)
    assert wait_for(out.exists, 120)
    caller.send_signal(signal.SIGTERM)
    assert caller.wait(timeout=30) == 42  # the stage's own SIGTERM handler ran


def test_a_killed_caller_takes_the_stage_with_it(stage, tmp_path):
    """SIGKILL of the script DVC started (no chance to forward anything): the forked stage must not live on."""
    script, env = stage
    out = tmp_path / "seen.json"
    caller = subprocess.Popen([sys.executable, str(script), "wait", str(out)], env=env, stdout=subprocess.DEVNULL)
    assert wait_for(lambda: out.exists() and out.stat().st_size > 0, 120)
    forked = json.loads(out.read_text())["pid"]
    assert pid_alive(forked)
    caller.kill()
    caller.wait(timeout=10)
    assert wait_for(lambda: not pid_alive(forked), 10)


def test_the_server_leaves_when_idle(stage, tmp_path):
    script, env = stage
    env = {**env, warm.IDLE_ENV: "2"}  # another environment: a server of its own
    out = tmp_path / "seen.json"
    for expected in (99, 0):
        done = subprocess.run([sys.executable, str(script), "0", str(out)], env=env, capture_output=True, timeout=180)
        assert done.returncode == expected
    name = name_of(script, env)

    def servers() -> list[str]:
        listed = subprocess.run(["pgrep", "-f", f"petpipe.warm serve {name}"], capture_output=True, text=True)
        return listed.stdout.split()

    assert servers()
    assert wait_for(lambda: not servers(), 30)  # idle 2 s, then gone


def test_switched_off_or_inside_torchrun_the_stage_runs_cold(stage, tmp_path):
    script, env = stage
    for extra in ({warm.SWITCH_ENV: "0"}, {"LOCAL_RANK": "0"}):
        done = subprocess.run(
            [sys.executable, str(script), "0", str(tmp_path / "x.json")], env={**env, **extra}, timeout=60
        )
        assert done.returncode == 99


def test_another_environment_is_another_server_but_not_another_stage(monkeypatch):
    script = ROOT / "stages" / "labels.py"
    name = warm.server_name(script)
    monkeypatch.setenv("DVC_STAGE", "labels")  # DVC's per-stage variables reach the stage, not the server's name
    monkeypatch.setenv(stage_clock.START_ENV, "1.0")
    assert warm.server_name(script) == name
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # torch reads it when imported: the server's modules would differ
    assert warm.server_name(script) != name
    assert name.startswith(f"\0petpipe-warm-{os.getuid()}-")


def test_the_execution_variable_is_lineages():
    from petpipe import lineage

    assert warm.EXECUTION_ENV == lineage.EXECUTION_ENV
