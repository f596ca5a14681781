"""petpipe.tracking.replay as the command an outage warning names. Replaying journals against a real server: a
training stage's in tests/test_executions_outage.py, the final model's in tests/test_executions.py."""

import json
import subprocess
import sys

import pytest

from petpipe.tracking.replay import replay
from petpipe.tracking.store import TrackingError


def test_the_replay_command_runs_as_a_module_and_names_its_usage(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "petpipe.tracking.replay"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2 and "usage: python -m petpipe.tracking.replay .petpipe/pending/" in result.stderr


def test_a_journal_whose_workspace_is_gone_is_kept_and_not_replayed(tmp_path):
    pending = tmp_path / "fetch-20260101-000000-abcdef01.json"
    pending.write_text(json.dumps({"stage": "fetch", "execution": "e", "cwd": str(tmp_path / "gone"), "calls": []}))
    with pytest.raises(TrackingError, match=r"which no longer exists .*nothing was replayed"):
        replay(pending)
    assert pending.exists()
