"""The final model in MLflow: logged once by finetune as the network and as a pyfunc taking raw images
(``ImageClassifierModel``, logged from code: ``petpipe/tracking/pyfunc.py``), optionally registered."""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd  # imported by mlflow anyway
from mlflow.tracking import MlflowClient

from petpipe.data.presize import JPEG_QUALITY, reduced
from petpipe.run import lineage
from petpipe.run.clock import phase
from petpipe.serve.classifier import load_classifier
from petpipe.tracking.store import TrackingError

if TYPE_CHECKING:
    from petpipe.tracking.runs import StageRun

CANDIDATE_ALIAS = "candidate"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # logged with the pyfunc: the code it runs when loaded
PYFUNC_CODE = PACKAGE_DIR / "tracking" / "pyfunc.py"  # the pyfunc, logged as a model from code


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc adapter around ``serve.classifier.load_classifier``: a DataFrame column ``image`` in, ``label`` and
    ``probability`` out."""

    def load_context(self, context) -> None:
        self._predict = load_classifier(Path(context.artifacts["checkpoint"]), **context.model_config)

    # A DataFrame hint: MLflow converts nothing and infers no schema from it (the signature is given
    # when logging), and it does not warn, at every import of this module, that hints are missing.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self._predict(model_input)


def set_model(model: ImageClassifierModel) -> None:
    """The model a "model from code" file defines (``PYFUNC_CODE`` calls it, so mlflow stays imported here only)."""
    import mlflow.models

    mlflow.models.set_model(model)


_warm_up: threading.Thread | None = None


def warm_up_model_logging(run: StageRun) -> None:
    """Start, in a background thread, the one-off cost that logging the final model pays at the end of the stage
    otherwise: MLflow's map of every installed package (read to check the given requirements against this
    environment: about a second, whatever the model). Called before training, so that it overlaps it;
    ``log_final_models`` waits for the thread. It imports nothing (MLflow has loaded the module): two threads
    importing one package tree can meet in a circular import, so torch.export's imports stay with the export
    (``train.compile`` imports the same compiler stack in the training thread)."""
    global _warm_up
    if _warm_up is None and run.records:  # torchrun processes other than rank 0 log nothing
        _warm_up = threading.Thread(target=_warm, name="petpipe-model-logging-warm-up", daemon=True)
        _warm_up.start()


def _warm() -> None:
    with contextlib.suppress(Exception):  # only a head start: whatever fails here is done, or fails, when logging
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()  # cached by MLflow for the process


def log_final_models(
    run: StageRun, checkpoint: Path, *, presize_size: int, example: Any, register_as: str | None = None
) -> None:
    """The final model on ``run`` (the active run), once, as two MLflow models of one checkpoint:

    - ``model``: the network, ``mlflow.pytorch.log_model`` (torch.export format), float32 NCHW at the
      training size, normalised with the mean/std training used (in the metadata) -> logits; signature and input
      example.
    - ``image_classifier``: a pyfunc taking raw images, a DataFrame column ``image`` of file paths or
      encoded bytes -> ``label``, ``probability``; this is the one registered as ``register_as``
      (alias ``candidate``), the one ``mlflow models serve`` can serve.

    Both carry the class names and the preprocessing in their metadata. The call is journaled: after
    an outage, ``tracking.replay`` logs it from the journal if the checkpoint is still this one.

    The stage pays for what users get, not for checks it can make cheaper (benchmarks/RESULTS.md, "Model-stage
    ceremony"): the requirements are given (no inference in a subprocess), the network is not loaded back and run
    on its example (MLflow's serving-input validation: tests load both models in a fresh process and predict),
    the checkpoint's digest is computed once for the journal and the run's output tags, and the one-off imports
    can overlap training (``warm_up_model_logging``). Phases: ``log_prepare`` (the warm-up's end, the checkpoint
    read, its digest), ``log_network``, ``log_pyfunc``, ``register``.
    """
    if not run.records:  # a torchrun process other than rank 0
        return
    if _warm_up is not None:
        with phase("log_prepare"):
            _warm_up.join()
    # JSON, for the journal: bytes as base64 (what the pyfunc reads from a JSON request anyway).
    images = [base64.b64encode(b).decode() if isinstance(b, bytes) else b for b in example["image"]]
    args = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "presize_size": int(presize_size),
        "example": {"image": images},
        "register_as": register_as,
    }
    with phase("log_prepare"):  # replay logs this very file, or nothing; stage_run's output tags reuse the digest
        digest = {"checkpoint_md5": lineage.dvc_digest(Path(checkpoint))}
    run.journaled("log_final_models", [{**args, **digest}], lambda: _log_models(run, **args))


def _log_models(
    run: StageRun, checkpoint: str, presize_size: int, example: dict[str, list[Any]], register_as: str | None
) -> None:
    if mlflow.active_run() is None or mlflow.active_run().info.run_id != run.run_id:
        raise TrackingError(f"log_final_models: run {run.run_id} is not the active run")
    with phase("log_prepare"):
        classifier = load_classifier(Path(checkpoint), presize_size=presize_size)
        frame = pd.DataFrame(example)
        inputs = classifier.inputs(list(frame["image"])).numpy()
    reduction = classifier.reduction  # the stored JPEG decoded at 1/reduction, as the loaders decode it
    decoded = f", decoded at 1/{reduction} ({reduced(presize_size, reduction)} px)" if reduction > 1 else ""
    preprocessing = (
        f"decode, EXIF-rotate, RGB; shorter side {presize_size} px; quality-{JPEG_QUALITY} JPEG round trip{decoded}; "
        f"centre square; bilinear to {classifier.size} px; scale to [0, 1]; normalise with "
        f"{classifier.normalization.describe()}"
    )
    metadata = {
        "classes": list(classifier.classes),
        "size": classifier.size,
        "presize_size": int(presize_size),
        "decode_reduction": reduction,
        "normalize": classifier.normalization.as_dict(),
        "preprocessing": preprocessing,
    }
    requirements = _requirements(timm=classifier.uses_timm)
    with phase("log_network"):
        _log_torch_model(classifier.model, inputs, len(classifier.classes), metadata, requirements)
    with phase("log_pyfunc"):
        info = _log_pyfunc_classifier(Path(checkpoint), int(presize_size), frame, metadata, requirements)
    if register_as:
        try:
            with phase("register"):
                register_model(info.model_uri, register_as, run.run_id)
        except Exception as err:  # the registry is optional: the stage's outputs and logged models stand
            why = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            run.client.set_tag(run.run_id, "petpipe.registration_error", why)
            print(
                f"warning: registering the final model as {register_as!r} failed ({why}); the model is logged as "
                f"{info.model_uri}: register it from the MLflow UI or with "
                f"mlflow.register_model('{info.model_uri}', '{register_as}')",
                file=sys.stderr,
            )


def _requirements(timm: bool) -> list[str]:
    """What loading the logged models needs; timm (and its safetensors) only for timm backbones."""
    packages = ("mlflow", "torch", "torchvision", "pillow", "pandas", "numpy", "pydantic", "pyyaml")
    packages += ("timm", "safetensors") if timm else ()
    return [f"{p}=={importlib.metadata.version(p)}" for p in packages]


def _log_torch_model(
    network: Any, example: Any, n_classes: int, metadata: dict[str, Any], requirements: list[str]
) -> Any:
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes))]),
    )
    logged = dict(
        name="model", signature=signature, input_example=example, pip_requirements=requirements, metadata=metadata
    )
    try:
        # No serving-input validation: it loads the exported program back and runs it on the example, seconds for
        # a resnet34 that the export has just traced. (Only here: the pickle format would hand the flag to
        # torch.save.)
        return mlflow.pytorch.log_model(network, serialization_format="pt2", validate_serving_input=False, **logged)
    except Exception as err:
        if not type(err).__module__.startswith("torch"):
            raise
        # torch.export cannot trace every network; the pickle format loads the same module (unpickling runs code:
        # trust the source).
        instead = "the network is logged in MLflow's pickle format instead"
        print(f"warning: torch.export failed ({type(err).__name__}); {instead}", file=sys.stderr)
        return mlflow.pytorch.log_model(network, serialization_format="pickle", **logged)


def _log_pyfunc_classifier(
    checkpoint: Path, presize_size: int, example: Any, metadata: dict[str, Any], requirements: list[str]
) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")]),
    )
    return mlflow.pyfunc.log_model(  # links the logged model to the active run, the stage's
        name="image_classifier",
        python_model=str(PYFUNC_CODE),
        artifacts={"checkpoint": str(checkpoint)},
        model_config={"presize_size": presize_size},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature,
        input_example=example,
        pip_requirements=requirements,
        metadata=metadata,
    )


def register_model(model_uri: str, name: str, run_id: str) -> str:
    """Register ``model_uri`` as a new version of ``name``, point the alias ``candidate`` at it; returns the version."""
    version = mlflow.register_model(model_uri, name, tags={"petpipe.run": run_id}).version
    MlflowClient().set_registered_model_alias(name, CANDIDATE_ALIAS, version)
    alias = f"alias {CANDIDATE_ALIAS}: models:/{name}@{CANDIDATE_ALIAS}"
    print(f"registered the final model as {name} version {version} ({alias})")
    return str(version)
