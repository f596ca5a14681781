"""Stage train_frozen: new head on a frozen body (BatchNorm stays trainable), one-cycle training."""

import sys

from petpipe.pipeline import LABELLED_DATA, run_train_frozen, stage_main

if __name__ == "__main__":
    sys.exit(
        stage_main(
            run_train_frozen,
            description=__doc__,
            arguments=[
                *LABELLED_DATA,
                ("checkpoint", "stage-1 checkpoint to write"),
                ("metrics", "final-epoch metrics JSON"),
                ("plot", "per-epoch metrics CSV"),
            ],
        )
    )
