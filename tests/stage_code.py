"""What a stage's code is, computed from the code itself: its project imports and its params reads.

Used by tests/test_stage_spec.py to check dvc.yaml, so `deps` and `params` cannot go stale.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "petpipe"
SOURCE = ROOT / "src"


def module_file(name: str) -> Path | None:
    """``petpipe.x.y`` -> src/petpipe/x/y.py (or its package __init__.py); None if not a project module."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = SOURCE.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module name imported anywhere in ``path`` (top level and inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from petpipe import report`
    return names


def parents(name: str) -> list[str]:
    """Importing ``petpipe.a.b`` runs ``petpipe/__init__.py`` and ``petpipe/a/__init__.py`` first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def project_files(script: Path) -> set[Path]:
    """``script`` plus every project file it imports, transitively."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            for module in [*parents(name), name]:
                found = module_file(module)
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def attribute_chains(tree: ast.AST, name: str) -> set[str]:
    """Every attribute chain on the variable ``name`` (``cfg.train.arch`` -> ``train.arch``; ``cfg.train`` ->
    ``train``)."""
    chains: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = []
            inner: ast.expr = node
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == name:
                chains.add(".".join(reversed(parts)))
    return chains


# Adapters that take a whole params section and read some of its keys (the one place each translates config
# into library arguments): a call ``adapter(cfg.<section>, ...)`` reads what the adapter's body reads of it.
ADAPTERS = {"loaders": ROOT / "src/petpipe/train/runner.py"}
# stage_main(..., torchrun_script=...) relaunches the stage under torchrun as stage.launch(cfg, ...) decides.
LAUNCH = ("launch", ROOT / "src/petpipe/run/stage.py")


def function_reads(path: Path, name: str, prefix: str = "") -> set[str]:
    """The attribute chains the function ``name`` in ``path`` reads on its first argument (``prefix.`` before each)."""
    function = next(
        n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef) and n.name == name
    )
    return {prefix + chain for chain in attribute_chains(function, function.args.args[0].arg)}


def adapter_reads(name: str, section: str) -> set[str]:
    """The keys of ``section`` that the adapter function ``name`` reads from its first argument."""
    return function_reads(ADAPTERS[name], name, f"{section}.")


def params_read(script: Path, config_name: str = "cfg") -> set[str]:
    """Params keys read in ``script`` as attribute chains on ``cfg`` (``cfg.train.arch`` -> ``train.arch``), and
    through the adapters it passes a section to."""
    tree = ast.parse(script.read_text(), str(script))
    chains = attribute_chains(tree, config_name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ADAPTERS and node.args:
            section = ".".join(sorted(attribute_chains(ast.Expression(node.args[0]), config_name), key=len)[-1:])
            chains |= adapter_reads(node.func.id, section)
        if isinstance(node, ast.Call) and any(k.arg == "torchrun_script" for k in node.keywords):
            chains |= function_reads(LAUNCH[1], LAUNCH[0])
    # Keep only the longest chains: `cfg.train.arch` also contains the node `cfg.train`.
    return {c for c in chains if not any(other.startswith(c + ".") for other in chains)}
