"""Rewrite each stage's code deps and params in dvc.yaml from the code (what tests/test_stage_spec.py checks).

    python scripts/sync_stage_spec.py        # edits dvc.yaml in place, prints what changed

Code deps are the stage script plus every project file it imports (transitively); params are the
script's PARAMS. Data deps (anything not ending in .py) and everything else are left as they are.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from stage_code import project_files  # noqa: E402


def stage_params(stage: str) -> list[str]:
    spec = importlib.util.spec_from_file_location(f"stage_{stage}", ROOT / "stages" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.PARAMS)


def code_deps(stage: str) -> list[str]:
    script = ROOT / "stages" / f"{stage}.py"
    return [f"stages/{stage}.py"] + sorted(p.relative_to(ROOT).as_posix() for p in project_files(script) if p != script)


def sync(text: str) -> str:
    out, stage, section = [], None, None
    for line in text.splitlines():
        if m := re.match(r"^  (\w+):$", line):
            stage, section = m.group(1), None
        elif m := re.match(r"^    (\w+):", line):
            section = m.group(1)
            out.append(line)
            if stage and (ROOT / "stages" / f"{stage}.py").is_file():
                if section == "deps":
                    out += [f"      - {d}" for d in code_deps(stage)]
                elif section == "params":
                    out += [f"      - {p}" for p in stage_params(stage)]
            continue
        if stage and section == "deps" and re.match(r"^      - \S+\.py$", line):
            continue
        if stage and section == "params" and re.match(r"^      - ", line):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    path = ROOT / "dvc.yaml"
    before = path.read_text()
    after = sync(before)
    sys.stdout.writelines(
        difflib.unified_diff(before.splitlines(True), after.splitlines(True), "dvc.yaml", "dvc.yaml (synced)")
    )
    path.write_text(after)
