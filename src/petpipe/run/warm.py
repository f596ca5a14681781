"""Warm stage processes (opt-in, ``PETPIPE_WARM=1``): one server per environment holds torch, torchvision and
MLflow imported, and forks a stage process for each stage script DVC starts, so the stages of a run pay those
imports once, not once each.

Off by default: a forked process is not a new process. What the server's fork copies from it (its threads'
absence, its hash seed, its allocator state) and what it cannot copy from the caller (its process group) make a
warm stage differ from a cold one in ways README.md lists; turn it on where the seconds matter more.

The script DVC starts stays the stage's process as DVC sees it: it connects to the server's socket (a file in a
folder only this user can enter, served by a process of this user: ``SO_PEERCRED``), hands over its command
line, environment and standard streams, forwards SIGINT and SIGTERM to the forked process, and exits with its
exit status (128+N when a signal N ended it), which the server relays from ``waitpid``. Any doubt before the
stage has started (no server, another user's, a timeout, a broken message, a server that cannot fork safely)
means the stage runs cold, in the script DVC started. If that script dies (even by SIGKILL), the forked process
kills itself. The server forks only while it is one thread without a CUDA context, belongs to one interpreter,
set of packages, environment, folder and process context (affinity, rlimits, umask, nice value, interpreter
flags, cgroup, namespaces), and exits after ``IDLE_ENV`` seconds (default 30) with no stage running. The forked
process runs the script as ``__main__`` and ends through the interpreter's normal exit (atexit, thread joins,
file finalisers). Linux only, kernel 5.3 or newer (pidfd).

    python -m petpipe.run.warm serve SOCKET      # what a stage script starts when no server of its environment runs
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import importlib.machinery
import json
import os
import random
import resource
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

from petpipe.run.clock import START_ENV
from petpipe.run.signals import handling_stops

EXECUTION_ENV = "PETPIPE_EXECUTION"  # lineage's; not imported here, so that a new server claims its name at once

SWITCH_ENV = "PETPIPE_WARM"  # 1: stages run in warm processes; anything else (the default): every stage starts cold
IDLE_ENV = "PETPIPE_WARM_IDLE"  # seconds a server waits for the next stage before it exits
PRELOAD_ENV = "PETPIPE_WARM_PRELOAD"  # comma-separated modules the server imports instead of PRELOAD (tests)
CHILD_ENV = "PETPIPE_WARM_CHILD"  # set in a forked stage process: it runs its stage, it never hands it off again
PRELOAD = (  # what the stages import, heaviest first
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
# The variables that keep PRELOAD's imports from starting threads (numpy's OpenBLAS pool, pyarrow's jemalloc
# purger). The server cannot set them for itself: a forked stage keeps the state its imports left. So the user
# sets them, for warm and cold stages alike, or the server runs every stage cold and says which it lacks.
THREAD_FREE_ENV = {"OPENBLAS_NUM_THREADS": "1", "JE_ARROW_MALLOC_CONF": "background_thread:false"}
# Set by DVC or the shell per command: they reach the stage, but do not make another server.
PER_COMMAND_ENV = {"DVC_STAGE", "PWD", "OLDPWD", "_", "SHLVL", START_ENV, EXECUTION_ENV}
PEERCRED = struct.Struct("3i")  # pid, uid, gid of the process at the other end of a Unix socket
HEADER = struct.Struct("!Q")  # every message: its length, then that many bytes of JSON
MAX_MESSAGE = 64 << 20  # a request holds the environment; more than this is not one
HANDSHAKE_SECONDS = 10.0  # the longest any read before the stage starts may wait (a fork of a big server: ~0.1 s)
RELAY_SECONDS = 10.0  # how long the caller waits for the exit status once the stage process has ended
SUN_PATH_MAX = 107  # bytes of a Unix socket's path (sockaddr_un), less the terminating NUL


class ProtocolError(Exception):
    """A message that is cut short, too long, not JSON, or not the one expected."""


# ---------------------------------------------------------------------------------------------
# Where the server is, and which one


def enabled() -> bool:
    """Asked for (``PETPIPE_WARM=1``) on Linux with pidfds, not inside a forked stage process nor a torchrun worker."""
    return (
        os.environ.get(SWITCH_ENV) == "1"
        and sys.platform == "linux"
        and hasattr(os, "pidfd_open")
        and CHILD_ENV not in os.environ
        and "LOCAL_RANK" not in os.environ
    )


def base_path(script: Path) -> list[str]:
    """The module search path without the script's folder and the checkout's ``src`` (the stage imports those)."""
    own = {str(script.resolve().parent), str(script.resolve().parents[1] / "src")}
    return [p for p in sys.path if p not in own]


def start_path(script: Path) -> list[str]:
    """``sys.path`` as the interpreter set it for ``script``: from the script's folder, which the interpreter put
    first, on (what comes before it, the script inserted: its checkout's ``src``; it inserts that again)."""
    folder = str(script.resolve().parent)
    return sys.path[sys.path.index(folder) :] if folder in sys.path else list(sys.path)


def umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it: a race with any other thread)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise OSError("no Umask line in /proc/self/status (Linux 4.7 or newer has it)")


def read_or_none(read: Any, *args: Any) -> Any:
    try:
        return read(*args)
    except OSError:
        return None


def process_context() -> dict[str, Any]:
    """What a process inherits from its parent besides the environment, and a fork does not take from the caller:
    a server started by a caller has the caller's; a caller with another context needs another server."""
    namespaces = sorted(os.listdir("/proc/self/ns")) if os.path.isdir("/proc/self/ns") else []
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": sorted(os.getgroups()),
        "cwd": os.getcwd(),  # the imports read the folder's files (a repository's matplotlibrc)
        "affinity": sorted(os.sched_getaffinity(0)),
        "rlimits": {
            name: list(resource.getrlimit(getattr(resource, name)))
            for name in dir(resource)
            if name.startswith("RLIMIT_")
        },
        "umask": umask(),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "flags": list(sys.flags),
        "warnoptions": list(sys.warnoptions),
        "xoptions": sorted([k, str(v)] for k, v in sys._xoptions.items()),
        "cgroup": read_or_none(Path("/proc/self/cgroup").read_text),
        "namespaces": {ns: read_or_none(os.readlink, f"/proc/self/ns/{ns}") for ns in namespaces},
    }


def identity(script: Path) -> str:
    """The digest naming the server for this interpreter, its installed packages, search path, environment and
    process context: any difference (another venv, a package installed since, another OMP_NUM_THREADS, another
    CPU affinity) is another server, as modules read these when they are imported."""
    packages = [p for p in base_path(script) if os.path.isdir(p)]
    described = {
        "server": [__file__, os.stat(__file__).st_mtime_ns],  # an edited warm.py: a new server for the new protocol
        "python": sys.executable,
        "path": base_path(script),
        "mtimes": [os.stat(p).st_mtime_ns for p in packages],
        "env": sorted((k, v) for k, v in os.environ.items() if k not in PER_COMMAND_ENV),
        "context": process_context(),
    }
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:24]  # 96 bits; a socket's path has 107 bytes


def private_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot hold a server's socket (None: it can): it must be a real folder (not a link), this
    user's, closed to everyone else, since whoever can create a file there could pose as the server."""
    try:
        info = os.lstat(folder)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder (a symbolic link or a file)"
    if info.st_uid != os.getuid():
        return f"belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
    if info.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(info.st_mode):o}: other users may enter it (0700 expected)"
    return None


def socket_folder() -> Path:
    """$XDG_RUNTIME_DIR/petpipe-warm when the runtime folder is this user's private one, else /tmp/petpipe-warm-UID;
    created 0700. Raises ``OSError`` naming the folder and what is wrong with it."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and private_folder_problem(Path(runtime)) is None:
        folder = Path(runtime) / "petpipe-warm"
    else:
        folder = Path("/tmp") / f"petpipe-warm-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
        os.chmod(folder, 0o700)  # mkdir's mode went through the umask
    if (problem := private_folder_problem(folder)) is not None:
        raise OSError(f"{folder} {problem}; remove it (or fix it) to use warm stage processes")
    return folder


def socket_path(script: Path) -> Path:
    """The socket of the server for ``script``'s environment. Raises ``OSError`` when there can be none."""
    path = socket_folder() / f"{identity(script)}.sock"
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise OSError(f"the socket path {path} is longer than a Unix socket allows ({SUN_PATH_MAX} bytes)")
    return path


# ---------------------------------------------------------------------------------------------
# Messages: a length, then JSON; the standard streams ride on the first bytes of the request


def send_message(connection: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    body = json.dumps(message).encode()
    header = HEADER.pack(len(body))
    if fds:
        sent = socket.send_fds(connection, [header], fds)
        connection.sendall(header[sent:] + body)
    else:
        connection.sendall(header + body)


def receive_exactly(connection: socket.socket, size: int, start: bytes = b"") -> bytes:
    """``size`` bytes (``start`` and what follows it): one recv returns what has arrived, not all that was sent."""
    chunks = [start]
    have = len(start)
    while have < size:
        chunk = connection.recv(min(size - have, 1 << 20))
        if not chunk:
            raise ProtocolError(f"the connection closed after {have} of {size} bytes")
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def receive_message(connection: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """One message, and the file descriptors that came with its first bytes (the caller closes them)."""
    fds: list[int] = []
    if max_fds:
        start, fds, flags, _ = socket.recv_fds(connection, HEADER.size, max_fds)
        if flags & socket.MSG_CTRUNC:
            close_all(fds)
            raise ProtocolError("file descriptors were cut off (MSG_CTRUNC)")
    else:
        start = connection.recv(HEADER.size)
    try:
        if not start:
            raise ProtocolError("the connection closed before a message")
        (size,) = HEADER.unpack(receive_exactly(connection, HEADER.size, start))
        if size > MAX_MESSAGE:
            raise ProtocolError(f"a message of {size} bytes (at most {MAX_MESSAGE})")
        message = json.loads(receive_exactly(connection, size))
        if not isinstance(message, dict):
            raise ProtocolError(f"a message that is not a JSON object: {message!r:.80}")
    except BaseException:
        close_all(fds)
        raise
    return message, fds


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# The stage script's side


def hand_off(script: Path, argv: list[str], started: float) -> int | None:
    """Run the stage in a warm process and return its exit code; None: run it here (off, no server, any doubt)."""
    if not enabled():
        return None
    try:
        path = socket_path(script)
    except OSError as err:
        return cold(str(err))
    try:
        connection = connect(path)
    except PermissionError as err:
        return cold(str(err))
    if connection is None:  # this stage runs cold, side by side with the new server's imports
        start_server_unless_starting(path, script)
        return None
    with connection:
        try:
            pid = start_stage(connection, script, argv, started)
        except (OSError, ProtocolError, ValueError, KeyError, TypeError) as err:  # timeout included
            return cold(f"no stage process from the server at {path} ({type(err).__name__}: {err})")
        if isinstance(pid, str):
            return cold(pid)
        return wait_for_stage(connection, pid)


def cold(reason: str) -> None:
    """One line on stderr saying why this stage does not run warm; None (run it here)."""
    print(f"petpipe.run.warm: {reason}; this stage runs cold", file=sys.stderr)
    return None


def connect(path: Path) -> socket.socket | None:
    """A connection to the server at ``path`` (None: no server). Raises ``PermissionError`` when another user's
    process serves it."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(HANDSHAKE_SECONDS)
    try:
        client.connect(str(path))
    except OSError:  # none there (ENOENT), a stale file (ECONNREFUSED): the server that starts replaces it
        client.close()
        return None
    _, uid, _ = peer(client)
    if uid != os.getuid():  # the folder is private, so only root could have put it there: still, not ours
        client.close()
        raise PermissionError(f"{path} is served by uid {uid}, not by this user (uid {os.getuid()})")
    return client


def peer(connection: socket.socket) -> tuple[int, int, int]:
    """pid, uid and gid of the process at the other end (for a server: as it was when it called listen)."""
    return PEERCRED.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))


def start_stage(connection: socket.socket, script: Path, argv: list[str], started: float) -> int | str:
    """Send the request; the forked stage process's pid (it waits for our go), or the server's reason to refuse."""
    from petpipe.run.lineage import execution_key

    request = {
        "argv": [str(script), *argv],  # sys.argv as the interpreter gave it to this script
        "file": os.path.abspath(script),
        "cwd": os.getcwd(),
        # The execution is found from this process (DVC's child), not from the forked one (the server's).
        "env": {**os.environ, START_ENV: repr(started), EXECUTION_ENV: execution_key()},
        "path": start_path(script),
        "context": process_context(),
    }
    with standard_streams() as fds:
        send_message(connection, request, fds)
    reply, _ = receive_message(connection)
    if "cold" in reply:
        return f"the server runs no stage now: {reply['cold']}"
    pid = int(reply["pid"])
    send_message(connection, {"go": True})
    return pid


def wait_for_stage(connection: socket.socket, pid: int) -> int:
    """Forward stop signals to the stage process ``pid`` until the server relays its wait status; its exit code."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # already gone and reaped: its status is on its way
        pidfd = None
    try:
        with forwarding_signals(pid, pidfd):
            status = relayed_status(connection, pidfd)
            if status is None and pidfd is not None:  # the server is gone: the stage may still run; wait for it
                select.select([pidfd], [], [])
    finally:
        if pidfd is not None:
            os.close(pidfd)
    if status is None:
        print(f"error: the stage process {pid} ended without an exit status (its warm server was killed?)",
              file=sys.stderr)  # fmt: skip
        return 1
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by signal N: 128+N, as a shell reports it


def relayed_status(connection: socket.socket, pidfd: int | None) -> int | None:
    """The stage's wait status from the server; None when the server closed without one."""
    connection.settimeout(None)  # the stage may run for hours; its end or the server's makes this readable
    watched = [connection] if pidfd is None else [connection, pidfd]
    if connection not in select.select(watched, [], [])[0]:  # the stage ended: the server relays at once
        connection.settimeout(RELAY_SECONDS)
    try:
        reply, _ = receive_message(connection)
        return int(reply["status"])
    except (OSError, ProtocolError, ValueError, KeyError, TypeError):
        return None


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
        close_all(spare)


def start_server_unless_starting(path: Path, script: Path) -> None:
    """Start a server for ``path`` in the background, unless one holds its lock (importing, or leaving)."""
    lock = lock_file(path)
    if lock is None:
        return
    os.close(lock)  # the server takes it; a second server started meanwhile finds it taken and exits
    start_server(path, script)


def lock_file(path: Path) -> int | None:
    """The server's lock for ``path``, taken (None: another process holds it)."""
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def start_server(path: Path, script: Path) -> None:
    """Start the server for ``path``: in this folder, with this interpreter's flags, this process's context."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *base_path(script)])}
    env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # should an import ask torch about CUDA: NVML, which a fork survives
    subprocess.Popen(
        [sys.executable, *subprocess._args_from_interpreter_flags(), "-m", "petpipe.run.warm", "serve", str(path)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # no terminal signals: it outlives this stage, for the next one
    )


def forwarding_signals(pid: int, pidfd: int | None) -> contextlib.AbstractContextManager[None]:
    """SIGINT and SIGTERM sent to this process go to the stage process (which stops cleanly on either)."""

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signum)  # never another process that got the pid since
            else:
                os.kill(pid, signum)

    return handling_stops(forward)


# ---------------------------------------------------------------------------------------------
# The server's side


def serve(path: str) -> None:
    """Take ``path``'s lock (or leave: another server has it), import ``PRELOAD``, listen on ``path``, then fork a
    stage process for each request until idle. A forked process leaves this function by ``SystemExit``."""
    socket_file = Path(path)
    lock = lock_file(socket_file)
    if lock is None:
        return
    preload()
    socket_file.unlink(missing_ok=True)  # a stale socket of a server that died: the lock says none serves it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    server = os.getpid()
    idle = float(os.environ.get(IDLE_ENV, "30"))
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> the stage's pid, its caller's connection
    last_active = time.monotonic()
    while children or time.monotonic() - last_active < idle:
        timeout = None if children else max(0.0, idle - (time.monotonic() - last_active))
        ready = select.select([listener, *children], [], [], timeout)[0]
        for fd in ready:
            if fd is listener:
                servers = [listener, lock, *children, *(connection for _, connection in children.values())]
                accepted = accept(listener, servers)
                if os.getpid() != server:  # the forked stage process, its stage run: how it ends
                    run_script(accepted)
                if accepted is not None:
                    children[accepted[0]] = accepted[1:]
            else:
                relay_exit(*children.pop(fd))
                os.close(fd)
        if ready:
            last_active = time.monotonic()
    socket_file.unlink(missing_ok=True)  # before the lock goes with the process: no caller connects to a leaver
    listener.close()


def preload() -> None:
    names = os.environ.get(PRELOAD_ENV)
    for module in PRELOAD if names is None else filter(None, names.split(",")):
        with contextlib.suppress(ImportError):
            __import__(module)


def accept(listener: socket.socket, servers: list[socket.socket | int]) -> Any:
    """Take one request: in the server, (pidfd, pid, connection) of the forked stage process, or None; in the
    forked process (which closes the server's ``servers``: sockets and file descriptors), the request to run."""
    connection, _ = listener.accept()
    connection.settimeout(HANDSHAKE_SECONDS)
    caller, uid, _ = peer(connection)
    if uid != os.getuid():  # the folder is private; this is for root, who can enter any
        connection.close()
        return None
    try:
        request, fds = receive_message(connection, max_fds=3)
    except (OSError, ProtocolError, ValueError):
        connection.close()
        return None
    if (refusal := fork_refusal(request, len(fds))) is not None:
        with contextlib.suppress(OSError):
            send_message(connection, {"cold": refusal})
        close_all(fds)
        connection.close()
        return None
    caller_fd = -1
    try:
        caller_fd = os.pidfd_open(caller)  # the forked process dies with the caller: it watches this
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
    except OSError as err:  # the caller is gone already, or no memory for a fork: it runs cold, if anything
        with contextlib.suppress(OSError):
            send_message(connection, {"cold": f"the server could not fork ({err})"})
        close_all([*fds, caller_fd] if caller_fd >= 0 else fds)
        connection.close()
        return None
    if pid == 0:
        for owned in servers:  # the listener, the lock, the other stages' pidfds and callers are the server's
            owned.close() if isinstance(owned, socket.socket) else os.close(owned)
        return become_stage_process(connection, request, fds, caller_fd)
    close_all([*fds, caller_fd])
    return os.pidfd_open(pid), pid, connection


def fork_refusal(request: dict[str, Any], fds: int) -> str | None:
    """Why this server must not fork the requested stage (None: it may)."""
    if fds != 3:
        return f"the request brought {fds} standard streams, not 3"
    tasks = sorted(os.listdir("/proc/self/task"))
    if len(tasks) != 1 or threading.active_count() != 1:
        names = [read_or_none(Path(f"/proc/self/task/{t}/comm").read_text) or "?" for t in tasks]
        needed = " ".join(f"{k}={v}" for k, v in THREAD_FREE_ENV.items())
        return (
            f"its imports started threads ({', '.join(n.strip() for n in names)}), which a fork would not copy; "
            f"with {needed} in the environment they start none"
        )
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "its imports created a CUDA context, which a forked process cannot use"
    theirs, ours = request.get("context"), process_context()
    if theirs != ours:
        differ = sorted(k for k in ours if not isinstance(theirs, dict) or theirs.get(k) != ours[k])
        return f"its process context differs from the caller's ({', '.join(differ)})"
    return None


def relay_exit(pid: int, connection: socket.socket) -> None:
    """Reap the stage process and tell its caller the wait status (it may be gone: then nobody is told)."""
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        send_message(connection, {"status": status})
    connection.close()


def become_stage_process(
    connection: socket.socket, request: dict[str, Any], fds: list[int], caller_fd: int
) -> dict[str, Any]:
    """In the forked process: take the caller's streams, folder, environment and search path, tell the caller
    this pid and wait for its go; then watch the caller. Returns the request; any failure before the go: exit."""
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            if fd != target:
                os.close(fd)
        become(request)
        send_message(connection, {"pid": os.getpid()})
        go, _ = receive_message(connection)
        if go.get("go") is not True:
            raise ProtocolError(f"expected the caller's go, got {go!r:.80}")
    except BaseException:  # the caller runs the stage cold (or is gone): this process never started it
        os._exit(70)
    connection.close()
    threading.Thread(target=die_with_the_caller, args=(caller_fd,), daemon=True).start()
    return request


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
    for stream in (sys.stdout, sys.stderr):  # the server's streams were /dev/null: buffered as a file is
        if stream.isatty():
            stream.reconfigure(line_buffering=True)


def die_with_the_caller(caller_fd: int) -> None:
    """The script DVC started is gone (killed, crashed): so is this stage, at once, as if it had been killed too."""
    select.select([caller_fd], [], [])
    os.kill(os.getpid(), signal.SIGKILL)


def run_script(request: dict[str, Any]) -> None:
    """Run the stage script as ``__main__``, as ``python SCRIPT`` would, and end this process as it would end:
    ``SystemExit`` or the script's exception leaves through the interpreter's shutdown (atexit, non-daemon
    threads joined, files flushed as they are finalised; an uncaught Ctrl-C ends it by SIGINT)."""
    file = request["file"]
    main = types.ModuleType("__main__")
    main.__dict__.update(
        __file__=file,
        __cached__=None,
        __builtins__=builtins,
        __loader__=importlib.machinery.SourceFileLoader("__main__", file),
        __spec__=None,
        __package__=None,
    )
    sys.modules["__main__"] = main
    with open(file, "rb") as source:
        code = compile(source.read(), file, "exec", dont_inherit=True)  # not this module's __future__ imports
    exec(code, main.__dict__)
    raise SystemExit(0)


if __name__ == "__main__":
    if sys.path and sys.path[0] == os.getcwd():  # -m put the caller's folder first; a stage's search path has not
        del sys.path[0]
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
        serve(sys.argv[2])
    else:
        sys.exit("usage: python -m petpipe.run.warm serve SOCKET")
