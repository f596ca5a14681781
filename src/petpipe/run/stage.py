"""What every stage script shares, kept small: its command line and the one-line error.

A stage script in ``stages/`` defines ``PARAMS`` (the params keys it reads, as in dvc.yaml),
``run(cfg, **paths)`` and ``main(argv)``; ``main`` calls ``stage_main`` here, and the script's
``__main__`` block ends with ``exit_process(main())``. Nothing heavy is imported: fetch and labels
start without torch.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from petpipe.run import clock as stage_clock
from petpipe.run import warm
from petpipe.run.config import Config, load_config
from petpipe.run.errors import PetpipeError, disk_full_error
from petpipe.run.files import write_json
from petpipe.run.signals import stop_on_signals
from petpipe.run.torchrun import relaunch_under_torchrun

# The path argument of every stage that reads the presized images (and the class names stored with them).
TRAINING_DATA = [("presized", "presized image store (presize stage)")]


def stage_main(
    run: Callable[..., Any],
    arguments: list[tuple[str, str]],
    description: str,
    multiple: tuple[str, ...] = (),
    argv: list[str] | None = None,
    torchrun_script: str | None = None,
) -> int:
    """``--params`` plus the named path arguments, then ``run(cfg, **paths)``.

    Arguments named in ``multiple`` take one or more paths. Known user errors print one clear
    line and return 2, without a traceback; so does a disk that fills outside petpipe's own writers
    (which name the output they were writing). A training stage names its script (``torchrun_script``):
    when ``distributed.*`` asks for several processes it runs again under torchrun (``launch``). The stage's
    start-up, work and teardown seconds (``stage_clock``) go to ``--timing`` and the MLflow parent run.
    """
    clock = stage_clock.CLOCK if argv is None else stage_clock.reset()  # a test calling main(): its own clock
    if argv is None and (code := warm.hand_off(Path(sys.argv[0]), sys.argv[1:], clock.started)) is not None:
        return code  # the stage ran in a warm process (petpipe.run.warm)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument(
        "--timing", type=Path, help="JSON file for the stage's start-up, work and teardown seconds (a DVC metric)"
    )
    for name, help_text in arguments:
        nargs = "+" if name in multiple else None
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, help=help_text, nargs=nargs
        )
    args = parser.parse_args(argv)
    try:
        with stop_on_signals():  # SIGTERM ends the stage like Ctrl-C: cleanly
            cfg = load_config(args.params)
            clock.begin_work()  # the stage run's body marks it again, nearer the work
            launched = (
                launch(cfg, list(sys.argv[1:] if argv is None else argv), torchrun_script) if torchrun_script else None
            )
            if launched is None:
                run(cfg, **{name: getattr(args, name) for name, _ in arguments})
            if clock.work_ended is None:
                clock.end_work()
            record_timing(clock, args.timing)
            if launched is not None:
                return launched
    except PetpipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk under a library's write (MLflow's artifact copy, say): one line too
        if (full := disk_full_error(err)) is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: no output was written as complete; run the stage again to resume a training stage from its "
            "last epoch",
            file=sys.stderr,
        )
        return 130
    return 0


def record_timing(clock: stage_clock.StageClock, path: Path | None) -> None:
    """The stage's fixed cost, to its listeners (the MLflow parent run) and ``path``; one line on stdout."""
    seconds = clock.finish()
    if path is not None:
        write_json(path, seconds)
    phases = ", ".join(f"{name} {value:.2f}" for name, value in seconds["phases"].items())
    where = " (warm stage process)" if warm.CHILD_ENV in os.environ else ""
    print(
        f"timing{where}: start-up {seconds['startup_seconds']:.2f} s, work {seconds['work_seconds']:.2f} s, "
        f"teardown {seconds['teardown_seconds']:.2f} s" + (f" (work: {phases})" if phases else "")
    )


def launch(cfg: Config, argv: list[str], script: str) -> int | None:
    """Several processes asked for: run ``script`` under torchrun and return their exit code; None: run it here."""
    return relaunch_under_torchrun(
        script, argv, nproc_per_node=cfg.distributed.nproc_per_node, nnodes=cfg.distributed.nnodes
    )


def exit_process(code: int) -> NoReturn:
    """End the stage script's process with ``code``, skipping the garbage collector's shutdown passes.

    torch, torchvision and MLflow leave hundreds of thousands of objects tracked by the garbage
    collector, whose shutdown passes cost seconds per model stage (benchmarks/RESULTS.md, "Stage
    exit"). By now every output is written and closed and the MLflow runs have ended.
    ``gc.freeze()`` puts the objects out of the collector's reach, so shutdown only frees by
    reference count. atexit handlers and the flushing of stdout and stderr still run. Only the
    ``__main__`` block of a stage script calls this; a test that calls ``main()`` keeps collecting.
    """
    gc.freeze()
    sys.exit(code)
