"""Stage finetune: unfreeze the stage-1 model, one-cycle with discriminative LRs (finetune.max_lr)."""

import sys

from petpipe.pipeline import LABELLED_DATA, run_finetune, stage_main

if __name__ == "__main__":
    sys.exit(
        stage_main(
            run_finetune,
            description=__doc__,
            arguments=[
                *LABELLED_DATA,
                ("checkpoint", "stage-1 checkpoint to read"),
                ("lr_find_result", "lr_find's suggested LRs (for max_lr: auto)"),
                ("final", "final model checkpoint to write"),
                ("metrics", "final-epoch metrics JSON"),
                ("plot", "per-epoch metrics CSV"),
            ],
        )
    )
