"""Warm stage processes: one server per environment holds torch, torchvision and MLflow imported, and forks a
stage process for each stage script DVC starts, so the eight stages of a run pay those imports once, not eight times.

The first stage of a run starts the server and runs cold beside its imports; the next ones are forked.
The script DVC starts stays the stage's process as DVC sees it: it hands its command line, working folder,
environment and standard streams to the server, forwards SIGINT and SIGTERM to the forked process, and exits
with its exit code. If the script that DVC started dies (even by SIGKILL), the forked process kills itself.
Each forked process drops the server's petpipe modules (a stage imports this checkout's, fresh). The server
never touches a GPU or a thread pool (a fork would inherit them), only serves processes of its own user, and
exits after ``IDLE_ENV`` seconds (default 30) with no stage running. Linux only; ``PETPIPE_WARM=0`` turns it
off (every stage starts cold).

    python -m petpipe.warm serve NAME          # what a stage script starts when no server of its environment runs
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import random
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from petpipe.signals import handling_stops
from petpipe.stage_clock import START_ENV

EXECUTION_ENV = "PETPIPE_EXECUTION"  # lineage's; not imported here, so that a new server claims its name at once

SWITCH_ENV = "PETPIPE_WARM"  # 0: every stage starts cold
IDLE_ENV = "PETPIPE_WARM_IDLE"  # seconds a server waits for the next stage before it exits
CHILD_ENV = "PETPIPE_WARM_CHILD"  # set in a forked stage process: it runs its stage, it never hands it off again
PRELOAD = (  # what the stages import, heaviest first; none of it starts a thread or touches a device
    "torch",
    "torchvision.models",
    "torchvision.transforms.v2",
    "mlflow",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "pandas",
    "PIL.Image",
    "matplotlib",
    "pydantic",
    "yaml",
    "tqdm",
)
# Set by DVC or the shell per command: they reach the stage, but do not make another server.
PER_COMMAND_ENV = {"DVC_STAGE", "PWD", "OLDPWD", "_", "SHLVL", START_ENV, EXECUTION_ENV}
PEERCRED = struct.Struct("3i")  # pid, uid, gid of the process at the other end of a Unix socket


# ---------------------------------------------------------------------------------------------
# The stage script's side


def enabled() -> bool:
    """On Linux, unless switched off, not inside a forked stage process and not one of torchrun's workers."""
    return (
        sys.platform == "linux"
        and os.environ.get(SWITCH_ENV, "1") != "0"
        and CHILD_ENV not in os.environ
        and "LOCAL_RANK" not in os.environ
    )


def base_path(script: Path) -> list[str]:
    """The module search path without the script's folder and the checkout's ``src`` (the stage imports those)."""
    own = {str(script.resolve().parent), str(script.resolve().parents[1] / "src")}
    return [p for p in sys.path if p not in own]


def server_name(script: Path) -> str:
    """The abstract socket name of the server for this interpreter, its installed packages, search path and
    environment: any difference (another venv, a package installed since, another OMP_NUM_THREADS) is another
    server, as modules read some of these when they are imported."""
    packages = [p for p in base_path(script) if os.path.isdir(p)]
    identity = {
        "server": [__file__, os.stat(__file__).st_mtime_ns],  # an edited warm.py: a new server for the new protocol
        "python": sys.executable,
        "path": base_path(script),
        "mtimes": [os.stat(p).st_mtime_ns for p in packages],
        "env": sorted((k, v) for k, v in os.environ.items() if k not in PER_COMMAND_ENV),
    }
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]
    return f"\0petpipe-warm-{os.getuid()}-{digest}"


def hand_off(script: Path, argv: list[str], started: float) -> int | None:
    """Run the stage in a warm process and return its exit code; None: run it here (off, or no server)."""
    if not enabled():
        return None
    from petpipe.lineage import execution_key

    name = server_name(script)
    connection = connect(name)
    if connection is None:  # this stage runs cold, side by side with the new server's imports
        start_server(name, script)
        return None
    with connection:
        request = {
            "argv": [str(script.absolute()), *argv],
            "cwd": os.getcwd(),
            # The execution is found from this process (DVC's child), not from the forked one (the server's).
            "env": {**os.environ, START_ENV: repr(started), EXECUTION_ENV: execution_key()},
            "path": sys.path,
        }
        reader = connection.makefile("rb")
        try:
            with standard_streams() as fds:
                socket.send_fds(connection, [json.dumps(request).encode() + b"\n"], fds)
            first = reader.readline()
        except OSError:
            first = b""
        if not first:
            return None  # the server did not fork (it was leaving, idle): run here
        pid = json.loads(first)["pid"]
        with forwarding_signals(pid):
            last = reader.readline()
    if not last:
        print(f"error: the stage process {pid} ended without an exit status (killed?)", file=sys.stderr)
        return 1
    return int(json.loads(last)["exit"])


@contextlib.contextmanager
def standard_streams():
    """File descriptors 0, 1 and 2, with /dev/null standing in for a closed one."""
    spare = []
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            spare.append(os.open(os.devnull, os.O_RDWR))
            fds.append(spare[-1])
    try:
        yield fds
    finally:
        for fd in spare:
            os.close(fd)


def connect(name: str) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(name)
    except OSError:
        client.close()
        return None
    return client


def start_server(name: str, script: Path) -> None:
    """Start a server for this environment, in the background: it claims ``name`` at once, then imports."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *base_path(script)])}
    env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # should an import ask torch about CUDA: NVML, which a fork survives
    subprocess.Popen(
        [sys.executable, "-m", "petpipe.warm", "serve", name.lstrip("\0")],
        env=env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # no terminal signals: it outlives this stage, for the next one
    )


def forwarding_signals(pid: int) -> contextlib.AbstractContextManager[None]:
    """SIGINT and SIGTERM sent to this process go to the stage process ``pid`` (which stops cleanly on either)."""

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    return handling_stops(forward)


# ---------------------------------------------------------------------------------------------
# The server's side


def serve(name: str) -> None:
    """Claim ``name`` (or exit: another stage started the same server first), import ``PRELOAD``, then fork a
    stage process for each request until idle. A stage that connects during the imports waits in the backlog."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind("\0" + name)
    except OSError:
        return
    listener.listen(64)
    for module in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(module)
    idle = float(os.environ.get(IDLE_ENV, "30"))
    children: set[int] = set()
    last_active = time.monotonic()
    while True:
        children -= reaped(children)
        if children:
            last_active = time.monotonic()
        elif time.monotonic() - last_active > idle:
            return
        if not select.select([listener], [], [], 0.5)[0]:
            continue
        connection, _ = listener.accept()
        if not from_this_user(connection):
            connection.close()
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            run_stage(connection)  # never returns
        children.add(pid)
        connection.close()
        last_active = time.monotonic()


def reaped(children: set[int]) -> set[int]:
    done = set()
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                done.add(pid)
    return done


def from_this_user(connection: socket.socket) -> bool:
    """Only the server's own user may have it run code (an abstract socket has no file permissions)."""
    _, uid, _ = PEERCRED.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
    return uid == os.getuid()


def run_stage(connection: socket.socket) -> None:
    """In the forked process: become the stage process the request describes, run its script, report the exit."""
    code = 1
    try:
        message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
        request = json.loads(message)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        become(request)
        connection.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        threading.Thread(target=die_with_the_caller, args=(connection,), daemon=True).start()
        code = run_script(request["argv"])
        atexit._run_exitfuncs()  # what a normal exit runs: MLflow ends its runs, loggers flush
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            connection.sendall(json.dumps({"exit": code}).encode() + b"\n")
        os._exit(code)


def become(request: dict[str, Any]) -> None:
    """The caller's folder, environment, arguments and search path; petpipe imported anew from its checkout."""
    os.chdir(request["cwd"])
    if "multiprocessing.process" in sys.modules:  # where a new process's pools resolve relative paths from
        sys.modules["multiprocessing.process"].ORIGINAL_DIR = request["cwd"]
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[CHILD_ENV] = "1"
    sys.argv = list(request["argv"])
    sys.path[:] = request["path"]
    for module in [m for m in sys.modules if m == "petpipe" or m.startswith("petpipe.")]:
        del sys.modules[module]
    random.seed()  # as a new process would: the server's state is every child's
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    for stream in (sys.stdout, sys.stderr):
        if stream.isatty():
            stream.reconfigure(line_buffering=True)


def die_with_the_caller(connection: socket.socket) -> None:
    """The script DVC started is gone (killed, crashed): so is this stage, at once, as if it had been killed too."""
    with contextlib.suppress(OSError):
        while connection.recv(1):
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def run_script(argv: list[str]) -> int:
    """Run the stage script as ``__main__``; its exit status as a process would have it."""
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
        serve(sys.argv[2])
    else:
        sys.exit("usage: python -m petpipe.warm serve NAME")
