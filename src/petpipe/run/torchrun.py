"""Re-running a training stage's own command under torchrun (no torch import: ``stage.py`` uses it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from petpipe.run.errors import PetpipeError

RDZV_ENV = "PETPIPE_RDZV_ENDPOINT"  # host:port of the rendezvous, needed with nnodes > 1


def under_torchrun() -> bool:
    """Whether this process is one of torchrun's workers."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(script: str | Path, argv: list[str], *, nproc_per_node: int, nnodes: int) -> list[str]:
    """``python -m torch.distributed.run ... script argv`` (torchrun, with the same interpreter)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc_per_node}",
        f"--nnodes={nnodes}",
    ]
    if nnodes == 1:
        command.append("--standalone")
    else:
        endpoint = os.environ.get(RDZV_ENV)
        if not endpoint:
            raise PetpipeError(
                f"distributed.nnodes: {nnodes} machines need {RDZV_ENV}=host:port (torchrun's rendezvous) set on each "
                "of them"
            )
        command += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={os.environ.get('DVC_EXP_NAME', 'petpipe')}",
        ]
    return [*command, str(script), *argv]


def relaunch_under_torchrun(script: str | Path, argv: list[str], *, nproc_per_node: int, nnodes: int) -> int | None:
    """Run this stage again as ``nproc_per_node`` processes and wait for them; None when one process will do
    (a single process, or this already is a torchrun worker)."""
    if nproc_per_node * nnodes == 1 or under_torchrun():
        return None
    command = torchrun_command(script, argv, nproc_per_node=nproc_per_node, nnodes=nnodes)
    print(
        f"distributed: {nproc_per_node} process(es) per node on {nnodes} node(s): {' '.join(command[1:5])} ...",
        flush=True,
    )
    code = subprocess.run(command).returncode
    if code != 0:
        print(f"error: the torchrun workers failed (exit code {code}); their messages are above", file=sys.stderr)
    return code if code >= 0 else 128 - code
