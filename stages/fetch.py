"""Stage fetch: download (or copy) the archive at data.url, verify data.sha256, extract the dataset."""

import sys

from petpipe.pipeline import run_fetch, stage_main

if __name__ == "__main__":
    sys.exit(stage_main(run_fetch, description=__doc__, arguments=[("dataset", "folder to extract the dataset into"), ("downloads", "folder for partial downloads")]))
