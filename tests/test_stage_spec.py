"""dvc.yaml against the code: each stage's code deps are exactly what its script imports, and its
params exactly what the script reads (less what changes no output: speed, tracking)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from stage_code import ROOT, params_read, project_files

PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = list(PIPELINE["stages"])
# Read by stages but without effect on any output: DVC must not re-run a stage when they change.
NO_OUTPUT_EFFECT = {
    "train.num_workers": "speed only",
    "train.store_on_device": "speed only: the same batches from the host loader or the store on the device",
    "mlflow.register_as": "MLflow registry only",
}


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def declared_code(stage: str) -> set[str]:
    return {d for d in PIPELINE["stages"][stage]["deps"] if d.endswith(".py")}


def code_mismatch(stage: str, script: Path) -> str:
    """'' when dvc.yaml lists exactly the script's project files, else what to add and remove."""
    actual = {f"stages/{stage}.py"} | {p.relative_to(ROOT).as_posix() for p in project_files(script) if p != script}
    declared = declared_code(stage)
    missing, extra = sorted(actual - declared), sorted(declared - actual)
    return (
        "" if not (missing or extra) else f"dvc.yaml stage {stage!r}: add to deps {missing}, remove from deps {extra}"
    )


def params_mismatch(stage: str, script: Path, declared_in_script: tuple[str, ...]) -> str:
    read = params_read(script) - set(NO_OUTPUT_EFFECT)
    declared = set(PIPELINE["stages"][stage].get("params", []))
    problems = []
    if read != declared:
        problems.append(
            f"dvc.yaml stage {stage!r} params: add {sorted(read - declared)}, remove {sorted(declared - read)}"
        )
    if read != set(declared_in_script):
        problems.append(
            f"{script.name} PARAMS: add {sorted(read - set(declared_in_script))}, remove "
            f"{sorted(set(declared_in_script) - read)}"
        )
    return "; ".join(problems)


def test_every_stage_script_is_a_dvc_stage():
    assert sorted(p.stem for p in (ROOT / "stages").glob("*.py")) == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_the_imported_files(stage):
    assert code_mismatch(stage, ROOT / "stages" / f"{stage}.py") == ""


@pytest.mark.parametrize("stage", STAGES)
def test_params_are_exactly_the_keys_the_stage_reads(stage):
    assert params_mismatch(stage, ROOT / "stages" / f"{stage}.py", load_stage(stage).PARAMS) == ""


def test_the_checks_fail_on_an_undeclared_import_or_param_read(tmp_path):
    script = tmp_path / "fetch.py"
    source = (ROOT / "stages/fetch.py").read_text()
    script.write_text(
        source.replace(
            "    from petpipe.sources.fetch import fetch\n",
            "    from petpipe.sources.fetch import fetch\n    from petpipe.report.html import img_tag\n",
        )
    )
    # the package's __init__.py too: importing petpipe.report.html runs it
    assert "add to deps ['src/petpipe/report/__init__.py', 'src/petpipe/report/html.py']" in code_mismatch(
        "fetch", script
    )
    script.write_text(source.replace("result = fetch(", "print(cfg.labels.rule)\n        result = fetch("))
    assert "params: add ['labels.rule']" in params_mismatch("fetch", script, load_stage("fetch").PARAMS)


def test_a_section_passed_to_an_adapter_reads_what_the_adapter_reads(tmp_path):
    """lr_find passes cfg.train to training.loaders, which reads train.size, batch_size, num_workers and augment;
    without that call those keys are no longer read, and the check says so."""
    script = tmp_path / "lr_find.py"
    source = (ROOT / "stages/lr_find.py").read_text()
    assert "loaders(cfg.train," in source
    script.write_text(source.replace("loaders(cfg.train,", "loaders(None,"))
    mismatch = params_mismatch("lr_find", script, load_stage("lr_find").PARAMS)
    assert "remove ['train.augment', 'train.batch_size', 'train.size']" in mismatch, mismatch


def test_fetch_and_labels_do_not_load_torch_code():
    for stage in ("fetch", "labels", "choose_lr"):
        names = {
            p.relative_to(ROOT / "src/petpipe").as_posix()
            for p in project_files(ROOT / "stages" / f"{stage}.py")
            if p.is_relative_to(ROOT / "src/petpipe")
        }
        assert not names & {
            "train/model.py",
            "train/engine.py",
            "train/runner.py",
            "data/loaders.py",
            "compute/device.py",
        }, stage


def test_editing_the_report_html_code_touches_only_the_report_stage():
    for module in ("src/petpipe/report/page.py", "src/petpipe/report/html.py"):
        assert [stage for stage in STAGES if module in declared_code(stage)] == ["report"], module


def test_model_logging_touches_only_finetune_and_replay_no_stage():
    """Only finetune logs the model; replay runs after an outage, outside any stage."""
    assert [stage for stage in STAGES if "src/petpipe/tracking/models.py" in declared_code(stage)] == ["finetune"]
    assert [stage for stage in STAGES if "src/petpipe/tracking/replay.py" in declared_code(stage)] == []
    for stage in ("fetch", "labels", "presize"):
        names = {p.relative_to(ROOT).as_posix() for p in project_files(ROOT / "stages" / f"{stage}.py")}
        assert not names & {"src/petpipe/tracking/models.py", "src/petpipe/serve/classifier.py"}, stage
