"""What every stage script shares, kept small: its command line and the one-line error.

A stage script in ``stages/`` defines ``PARAMS`` (the params keys it reads, as in dvc.yaml),
``run(cfg, **paths)`` and ``main(argv)``; ``main`` calls ``stage_main`` here. Nothing heavy is
imported: fetch and labels start without torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from petpipe.config import load_config
from petpipe.errors import PetpipeError
from petpipe.signals import stop_on_signals

# The path argument of every stage that reads the presized images (and the class names stored with them).
TRAINING_DATA = [("presized", "presized image store (presize stage)")]


def stage_main(
    run: Callable[..., Any], arguments: list[tuple[str, str]], description: str, multiple: tuple[str, ...] = (), argv: list[str] | None = None,
    launcher: Callable[[Any, list[str]], int | None] | None = None,
) -> int:  # fmt: skip
    """``--params`` plus the named path arguments, then ``run(cfg, **paths)``.

    Arguments named in ``multiple`` take one or more paths. Known user errors print one clear
    line and return 2, without a traceback. ``launcher(cfg, argv)`` may run the stage elsewhere
    instead (several torchrun processes) and return their exit code; None runs it here.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    for name, help_text in arguments:
        nargs = "+" if name in multiple else None
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, help=help_text, nargs=nargs)
    args = parser.parse_args(argv)
    try:
        with stop_on_signals():  # SIGTERM ends the stage like Ctrl-C: cleanly
            cfg = load_config(args.params)
            launched = launcher(cfg, list(sys.argv[1:] if argv is None else argv)) if launcher else None
            if launched is not None:
                return launched
            run(cfg, **{name: getattr(args, name) for name, _ in arguments})
    except PetpipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was written as complete; run the stage again to resume a training stage from its last epoch", file=sys.stderr)
        return 130
    return 0

