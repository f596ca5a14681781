"""Log what a stage kept during a tracking outage (``.petpipe/pending/<stage>-*.json``, written by
``tracking.runs``) as a new run of its stage: ``python -m petpipe.tracking.replay FILE...``.

No stage imports this module: editing it re-runs nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from petpipe.run import lineage
from petpipe.tracking.runs import REPLAY_COMMAND, StageRun, stage_run
from petpipe.tracking.store import TrackingError

# Journal names of the final-model call: ``models.log_final_models``, and its name before tracking was a package.
FINAL_MODEL_CALLS = ("log_final_models", "log_image_classifier")


def replay(pending: Path) -> str:
    """Log a pending journal (written during an outage) as a new run of its stage, under its execution's parent.

    The journal's paths are relative to the stage's working directory: if that folder is gone (a DVC
    temp or queue workspace), nothing is replayed. The final model is logged only if the checkpoint
    is still the one trained (its DVC digest), and is not registered: registering an old run could
    move the alias ``candidate`` away from a newer model.
    """
    pending = Path(pending).resolve()
    record = json.loads(pending.read_text())
    if not Path(record["cwd"]).is_dir():
        raise TrackingError(
            f"{pending}: the stage ran in {record['cwd']}, which no longer exists (a DVC temp or queue workspace?): "
            "its files are gone, nothing was replayed"
        )
    os.chdir(record["cwd"])
    os.environ[lineage.EXECUTION_ENV] = record["execution"]
    calls = record["calls"]
    params = next((args[0] for name, args in calls if name == "log_params"), {})
    with stage_run(record["stage"], params) as run:
        run.set_tags({"petpipe.replayed_from": str(pending)})
        for name, args in calls[1:] if calls and calls[0][0] == "log_params" else calls:
            if name in FINAL_MODEL_CALLS:
                replay_final_model(run, args[0])
            elif name == "log_dataset":
                run.log_dataset(Path(args[0]), args[1])
            else:
                getattr(run, name)(*args)
    Path(pending).unlink()
    return run.run_id


def replay_final_model(run: StageRun, spec: dict[str, Any]) -> None:
    """The journaled final model, if its checkpoint is still the trained one; never registered."""
    from petpipe.tracking.models import log_final_models  # torch and the serving code: only when there is a model

    checkpoint = Path(spec["checkpoint"])
    if "example" not in spec or lineage.dvc_digest(checkpoint) != spec.get("checkpoint_md5"):
        print(
            f"warning: {checkpoint} is not the checkpoint this run trained (missing, or changed since): "
            "the final model is not logged; run the finetune stage again to log it",
            file=sys.stderr,
        )
        return
    log_final_models(run, checkpoint, presize_size=spec["presize_size"], example=spec["example"])
    if spec.get("register_as"):
        print(
            "not registered on replay (the alias candidate may point at a newer model): register this run's "
            f"image_classifier as {spec['register_as']!r} from the MLflow UI if it is the one you want",
            file=sys.stderr,
        )


def main(argv: list[str]) -> int:
    if not argv:
        print(f"usage: {REPLAY_COMMAND} .petpipe/pending/<stage>-....json ...", file=sys.stderr)
        return 2
    for file in argv:
        print(f"replayed {file} as run {replay(Path(file))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
