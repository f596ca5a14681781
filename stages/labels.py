"""Stage labels: label every image (labels.rule), split train/valid, verify images."""

import sys

from petpipe.pipeline import run_labels, stage_main

if __name__ == "__main__":
    sys.exit(stage_main(run_labels, description=__doc__, arguments=[("dataset", "extracted dataset folder"), ("out_dir", "folder for table.csv, classes.json, skipped.csv"), ("metrics", "counts JSON")]))
