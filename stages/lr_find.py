"""Stage lr_find: LR range test on the unfrozen stage-1 model; writes the curve and suggested LRs."""

import sys

from petpipe.pipeline import LABELLED_DATA, run_lr_find, stage_main

if __name__ == "__main__":
    sys.exit(
        stage_main(
            run_lr_find,
            description=__doc__,
            arguments=[
                *LABELLED_DATA,
                ("checkpoint", "stage-1 checkpoint to read"),
                ("result", "suggested LRs JSON"),
                ("plot", "loss-vs-LR CSV"),
                ("figure", "loss-vs-LR PNG"),
            ],
        )
    )
