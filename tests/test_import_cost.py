"""benchmarks/import_cost.py: reading `python -X importtime`, and one real line."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import import_cost  # noqa: E402

SAMPLE = """import time: self [us] | cumulative | imported package
import time:       100 |        100 | _io
import time:      2000 |    1200000 |   torch._C
import time:      5000 |    1300000 | torch
import time:       300 |     950000 |     torch._dynamo
import time:      1000 |    1000000 |   torchvision.ops
import time:      2000 |    1100000 | torchvision
import time:       700 |     400000 |   torch._dynamo
import time:      9000 |     900000 | mlflow
"""


def test_the_cumulative_seconds_of_each_module_where_it_was_first_imported() -> None:
    seconds = import_cost.cumulative_seconds(SAMPLE)
    assert seconds["torch"] == 1.3 and seconds["torchvision"] == 1.1 and seconds["mlflow"] == 0.9
    assert seconds["torch._dynamo"] == 0.95  # its first import, under torchvision.ops; not the later cached one
    assert round(import_cost.top_level_seconds(SAMPLE), 6) == round(0.0001 + 1.3 + 1.1 + 0.9, 6)


def test_a_real_import_line_names_its_seconds() -> None:
    line = import_cost.import_line(("json", "petpipe.run.clock"))
    assert line.startswith("wall ") and " s, imports " in line
