"""Stage choose_lr: the fine-tuning LRs [lo, hi]: finetune.max_lr as given, or from lr_find's valley (auto).

finetune depends on this small file rather than on lr_find's result, so with explicit LRs a new
LR-finder curve does not re-run fine-tuning (the chosen LRs come out unchanged and DVC skips it).
Bookkeeping only: no MLflow run (finetune logs the LRs it used).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout's petpipe, not whichever one is installed: a DVC temp or queue workspace runs its own code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from petpipe.run.config import Config  # noqa: E402
from petpipe.run.stage import exit_process, stage_main  # noqa: E402

PARAMS = ("finetune.max_lr",)


def run(cfg: Config, *, lr_find_result: Path, chosen: Path) -> dict:
    from petpipe.run.files import write_json
    from petpipe.train.lr_choice import choose_max_lr

    result = choose_max_lr(cfg.finetune.max_lr, lr_find_result)
    write_json(chosen, result)
    print(f"choose_lr: lo={result['lo']:.3g} hi={result['hi']:.3g} ({result['source']})")
    return result


def main(argv: list[str] | None = None) -> int:
    arguments = [
        ("lr_find_result", "lr_find's suggested LRs (used when finetune.max_lr is auto)"),
        ("chosen", "chosen LRs JSON to write"),
    ]
    return stage_main(run, arguments, description=__doc__, argv=argv)


if __name__ == "__main__":
    exit_process(main())
