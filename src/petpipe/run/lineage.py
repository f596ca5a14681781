"""What ties the MLflow runs of one pipeline execution together, without MLflow: the execution
key, the params of a stage and of the stages upstream of it, and DVC-compatible digests.

**One execution** is one `dvc` process: `dvc repro`, `dvc exp run` (in the workspace), and each
`dvc exp exec-run` process that DVC starts per experiment for `--temp`, `--queue` and
`dvc queue start -j N` (each queued experiment has its own, so two running side by side are two
executions). Every stage process walks up its parent processes to the nearest `dvc` process and
keys the execution by (host, that pid, its start time): identical for every stage of the
execution, different for the next one even when the pid is reused. ``PETPIPE_EXECUTION`` set in
the environment overrides it (a wrapper, or tests that run stage mains in-process); a stage run by
hand, outside DVC, is an execution of its own (keyed by its own process). Accepted edge cases:
a stage retried by hand after a failed `dvc repro` forms a new execution; a remote/CI runner that
wraps `dvc` in another process still works, as long as `dvc` itself is an ancestor.

**Upstream params** come from dvc.yaml read at run time, for logging only (no stage's outputs
depend on it, so DVC need not re-run anything when it changes): a stage is upstream of another
when one of its outs is, or contains, one of the other's deps; the params logged on a stage run
are its own plus those listed for every stage upstream of it.

**Digests** are DVC's: the MD5 of a file, and for a folder the MD5 of the JSON list of its files'
MD5s plus ``.dir``, so a digest logged in MLflow can be compared with dvc.lock and `dvc status`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from petpipe.run.config import parse_yaml, select_flat
from petpipe.run.files import md5_of

PIPELINE_FILE = "dvc.yaml"
LOCK_FILE = "dvc.lock"
EXECUTION_ENV = "PETPIPE_EXECUTION"
_VAR = re.compile(r"\$\{([^}]+)\}")


# ---------------------------------------------------------------------------------------------
# One execution


def _process(pid: int) -> tuple[int, str, list[str]] | None:
    """(parent pid, start time in clock ticks, argv) from /proc, or None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name in parentheses may hold spaces
    return int(fields[1]), fields[19], [a.decode(errors="replace") for a in argv if a]


def is_dvc_command(argv: list[str]) -> bool:
    """`dvc ...`, `/path/to/dvc ...`, `python -m dvc ...` or `python /path/to/dvc ...`."""
    names = [Path(a).name for a in argv[:3]]
    return bool(names) and (names[0] == "dvc" or (len(names) > 1 and names[1] == "dvc") or argv[1:3] == ["-m", "dvc"])


def execution_key(env: dict[str, str] | None = None) -> str:
    """The key every stage of one execution computes identically (see the module docstring)."""
    env = os.environ if env is None else env
    if env.get(EXECUTION_ENV):
        return env[EXECUTION_ENV]
    own = os.getpid()
    current, anchor = own, None
    for _ in range(64):  # a process tree is never this deep; stops on a loop too
        info = _process(current)
        if info is None:
            break
        ppid, started, argv = info
        if is_dvc_command(argv):
            anchor = (current, started)
            break
        if ppid <= 1:
            break
        current = ppid
    if anchor is None:
        info = _process(own)
        anchor = (own, info[1] if info else "0")
    return hashlib.sha1(f"{socket.gethostname()}:{anchor[0]}:{anchor[1]}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The stage graph of dvc.yaml


def find_pipeline(candidates: Iterable[Path]) -> Path | None:
    return next((p / PIPELINE_FILE for p in candidates if (p / PIPELINE_FILE).is_file()), None)


def _resolve(value: str, variables: dict[str, Any]) -> str:
    def lookup(match: re.Match) -> str:
        node: Any = variables
        for part in match.group(1).strip().split("."):
            node = node[part]
        return str(node)

    return _VAR.sub(lookup, value)


def _path_of(entry: Any) -> str:
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


def load_stages(pipeline: Path) -> dict[str, dict[str, list[str]]]:
    """{stage: {"deps": [...], "outs": [...], "params": [...]}} with `${...}` vars resolved (outs include metrics and
    plots)."""
    spec = parse_yaml(pipeline.read_text())
    variables: dict[str, Any] = {}
    for block in spec.get("vars", []):
        if isinstance(block, dict):
            variables.update(block)
    stages = {}
    for name, stage in spec.get("stages", {}).items():
        outs = [_path_of(o) for key in ("outs", "metrics", "plots") for o in stage.get(key, [])]
        params = [p for p in stage.get("params", []) if isinstance(p, str)]
        stages[name] = {
            "deps": [_resolve(_path_of(d), variables) for d in stage.get("deps", [])],
            "outs": [_resolve(o, variables) for o in outs],
            "params": params,
        }
    return stages


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def upstream(stages: dict[str, dict[str, list[str]]], stage: str) -> list[str]:
    """Every stage whose outputs feed ``stage``, directly or through others, in dvc.yaml order."""
    found: set[str] = set()
    todo = [stage]
    while todo:
        deps = stages[todo.pop()]["deps"]
        for name, other in stages.items():
            if name not in found and any(_inside(d, o) for d in deps for o in other["outs"]):
                found.add(name)
                todo.append(name)
    return [name for name in stages if name in found]


def lineage_params(stages: dict[str, dict[str, list[str]]], stage: str, resolved: dict[str, Any]) -> dict[str, Any]:
    """The params of ``stage`` and of every stage upstream of it, from the flattened params."""
    if stage not in stages:
        return {}
    keys = [k for name in [*upstream(stages, stage), stage] for k in stages[name]["params"]]
    return select_flat(resolved, keys)


# ---------------------------------------------------------------------------------------------
# Digests


def dvc_digest(path: Path) -> str | None:
    """DVC's MD5 of a file or folder (folders: ``<md5 of the JSON listing>.dir``); None if it does not exist."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        return None
    entries = sorted(
        ({"md5": file_md5(p), "relpath": p.relative_to(path).as_posix()} for p in path.rglob("*") if p.is_file()),
        key=lambda e: e["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


_MD5S: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> MD5, for this process


def file_md5(path: Path) -> str:
    """MD5 of a file, read once per process while the file stays the same (a checkpoint's digest for the model
    logging's journal and again for the stage run's output tags). A rewritten file is read again: atomic
    writes give it another inode, and any write another modification time."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _MD5S:
        _MD5S[key] = md5_of(path)
    return _MD5S[key]


def locked_digests(lock: Path) -> dict[str, str]:
    """{path: md5} of every stage output recorded in dvc.lock ({} without one)."""
    try:
        spec = parse_yaml(lock.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {o["path"]: o["md5"] for s in spec.get("stages", {}).values() for o in s.get("outs", []) if "md5" in o}
