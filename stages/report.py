"""Stage report: interpret the final model on the validation set and write the self-contained HTML report."""

import sys

from petpipe.pipeline import LABELLED_DATA, run_report, stage_main

if __name__ == "__main__":
    sys.exit(
        stage_main(
            run_report,
            description=__doc__,
            arguments=[
                *LABELLED_DATA,
                ("final", "final model checkpoint"),
                ("curves", "per-epoch CSVs of the training stages"),
                ("lr_find_figure_path", "lr_find PNG to embed"),
                ("out_dir", "folder for confusion, top losses, per-class files"),
                ("html_path", "HTML report to write"),
                ("metrics", "validation metrics JSON"),
            ],
            multiple=("curves",),
        )
    )
