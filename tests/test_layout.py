"""The package layout shows the architecture: subpackages by concern, stacked in layers.

Each subpackage sits on the ones below it and imports only those (and itself): no arrow back up, no circle
between modules, counting every import (top level, inside functions, under TYPE_CHECKING). A folder holds at
most MAX_MODULES modules, no module name repeats its folder's concern, and every ``__init__.py`` imports
nothing (a stage's DVC deps are the files it imports, its packages' ``__init__.py`` among them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from stage_code import PACKAGE, SOURCE

# Each subpackage and the ones it sits on directly; it may import those and everything below them.
SITS_ON = {
    "run": (),  # params, errors, files, signals, the stage entry and its clock, torchrun, warm processes, lineage
    "compute": ("run",),  # device and precision, the process group
    "sources": ("run",),  # download, archive, fetch
    "data": ("compute",),  # labels and table, presize, the store on the device, loaders, augmentation
    "train": ("data",),  # model, engine, schedule, resume, lr_find, the fine-tuning LRs, runner
    "report": ("train",),  # the report stage: page, build, figures, html, inputs, interpretation
    "serve": ("train",),  # the raw-image predictor behind the logged model
    "tracking": ("serve",),  # MLflow: store, runs, links, models, replay, the pyfunc
}
MAX_MODULES = 10


def below(package: str, sits_on: dict[str, tuple[str, ...]] = SITS_ON) -> set[str]:
    """Every subpackage ``package`` may import: itself and all it sits on, directly or not."""
    allowed, todo = {package}, list(sits_on[package])
    while todo:
        name = todo.pop()
        if name not in allowed:
            allowed.add(name)
            todo += sits_on[name]
    return allowed


def module_name(path: Path, source: Path) -> str:
    parts = path.relative_to(source).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(source: Path, package: str = PACKAGE) -> dict[str, Path]:
    return {module_name(p, source): p for p in sorted((source / package).rglob("*.py"))}


def imports(path: Path, modules: dict[str, Path], package: str = PACKAGE) -> set[str]:
    """The project modules ``path`` imports anywhere in it (``from a.b import c`` counts ``a.b.c`` when that is a
    module, else ``a.b``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import (stage_code.py and DVC deps read absolute ones only)"
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            ]
        else:
            continue
        found |= {name for name in names if name in modules and name != package}
    return found


def import_graph(source: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = project_modules(source, package)
    return {name: imports(path, modules, package) for name, path in modules.items()}


def upward_imports(
    graph: dict[str, set[str]], sits_on: dict[str, tuple[str, ...]], package: str = PACKAGE
) -> list[str]:
    """'a.b imports c.d' for every import from a subpackage that is not below the importer's, or from a module
    outside the known subpackages."""

    def layer(name: str) -> str | None:
        parts = name.split(".")
        return parts[1] if len(parts) > 1 else None

    wrong = []
    for module, imported in sorted(graph.items()):
        if layer(module) is not None and layer(module) not in sits_on:
            wrong.append(f"{module} is in no layer of SITS_ON")
            continue
        for target in sorted(imported):
            if layer(module) is None or layer(target) not in below(layer(module), sits_on):
                wrong.append(f"{module} imports {target}")
    return wrong


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, as the modules along it (depth-first search; one circle per back edge)."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def layout_problems(source: Path, package: str = PACKAGE, max_modules: int = MAX_MODULES) -> list[str]:
    """Folders over ``max_modules``, module names that repeat their folder, modules outside a subpackage, and any
    ``__init__.py`` that imports."""
    problems = []
    for folder in sorted({p.parent for p in (source / package).rglob("*.py")}):
        modules = sorted(p.stem for p in folder.glob("*.py") if p.name != "__init__.py")
        if len(modules) > max_modules:
            problems.append(f"{folder.relative_to(source)} holds {len(modules)} modules (at most {max_modules})")
        if folder == source / package and modules:
            problems.append(f"{folder.relative_to(source)} holds modules outside any subpackage: {modules}")
        concern = folder.name.removesuffix("s")
        problems += [
            f"{folder.relative_to(source)}/{m}.py repeats its folder" for m in modules if m.startswith(concern)
        ]
        init = folder / "__init__.py"
        if not init.is_file():
            problems.append(f"{folder.relative_to(source)} has no __init__.py")
        elif any(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(ast.parse(init.read_text()))):
            problems.append(
                f"{init.relative_to(source)} imports (every stage importing the package would depend on it)"
            )
    return problems


GRAPH = import_graph(SOURCE)


def test_every_subpackage_imports_only_the_layers_below_it():
    assert upward_imports(GRAPH, SITS_ON) == []


def test_no_import_circles_between_modules():
    assert circles(GRAPH) == []


def test_folders_are_small_named_by_concern_and_their_init_files_empty():
    assert layout_problems(SOURCE) == []
    assert sorted(p.name for p in (SOURCE / PACKAGE).iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        SITS_ON
    )


def test_train_reaches_tracking_only_through_the_run_it_is_handed():
    """The model stages pass their MLflow run down; train/ types it with a Protocol, so it never imports tracking."""
    assert not any(target.startswith(f"{PACKAGE}.tracking") for m, t in GRAPH.items() if ".train." in m for target in t)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    "files, problem",
    [
        (
            {"pp/low/a.py": "def f():\n    from pp.high.b import g\n", "pp/high/b.py": "from pp.low import a\n"},
            "pp.low.a imports pp.high.b",
        ),
        (
            {
                "pp/low/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pp.high import b\n",
                "pp/high/b.py": "",
            },
            "pp.low.a imports pp.high.b",
        ),
    ],
)
def test_the_check_finds_an_import_from_a_higher_layer_also_inside_a_function(tmp_path, files, problem):
    source = write_tree(tmp_path, {"pp/__init__.py": "", "pp/low/__init__.py": "", "pp/high/__init__.py": "", **files})
    assert upward_imports(import_graph(source, "pp"), {"low": (), "high": ("low",)}, "pp") == [problem]


def test_the_check_finds_a_circle_a_crowded_folder_a_repeated_prefix_and_an_importing_init(tmp_path):
    source = write_tree(
        tmp_path,
        {
            "pp/__init__.py": "",
            "pp/low/__init__.py": "from pp.low import a\n",
            "pp/low/a.py": "def f():\n    from pp.low import b\n",
            "pp/low/b.py": "import pp.low.c\n",
            "pp/low/c.py": "from pp.low.a import f\n",
            "pp/low/low_more.py": "",
        },
    )
    assert circles(import_graph(source, "pp")) == [["pp.low.a", "pp.low.b", "pp.low.c", "pp.low.a"]]
    assert layout_problems(source, "pp", max_modules=3) == [
        "pp/low holds 4 modules (at most 3)",
        "pp/low/low_more.py repeats its folder",
        "pp/low/__init__.py imports (every stage importing the package would depend on it)",
    ]
