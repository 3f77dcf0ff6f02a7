"""ldm's layers, read from the source: no module imports a higher layer, and no module-level import cycle.

    ldm (the package face) > ldm.cli > ldm.training, ldm.server > ldm.pipeline > ldm.loading, ldm.adapters
    > ldm.speedups, ldm.guidance > ldm.models, ldm.schedulers, ldm.prompts, ldm.prompt_schedule, ldm.images, ldm.previews,
    ldm.settings, ldm.control, ldm.residency, ldm.masks, ldm.inpainting > ldm.kernels
    > ldm.io, ldm.cache, ldm.errors, ldm.random, ldm.checks, ldm.paging

A module may import its own layer and the layers below, and the package ``ldm`` itself (its
``__version__``: Python runs ``ldm/__init__.py`` before any submodule anyway; it imports the pipeline
only when ``ldm.Pipeline`` is read). Every import counts for the order, also one
inside a function (it is still a dependency); the cycle check follows what runs at import time
(module level, outside ``if TYPE_CHECKING:``). The AST is read, nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ldm"

LAYERS = [
    ("ldm.io", "ldm.cache", "ldm.errors", "ldm.random", "ldm.checks", "ldm.paging"),
    ("ldm.kernels",),
    ("ldm.models", "ldm.schedulers", "ldm.prompts", "ldm.prompt_schedule", "ldm.images", "ldm.previews", "ldm.settings", "ldm.control", "ldm.sdxl",
     "ldm.residency", "ldm.masks", "ldm.inpainting"),
    ("ldm.speedups", "ldm.guidance"),
    ("ldm.loading", "ldm.adapters"),
    ("ldm.pipeline",),
    ("ldm.training", "ldm.server"),  # applications of the pipeline: training renders its samples with it
    ("ldm.cli", "ldm.__main__"),
    ("ldm",),
]

# Upward imports that today's code makes on purpose, each inside the function that needs it.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = _modules()


def _layer(module: str) -> int:
    """The layer of ``module``: that of its longest listed prefix."""
    best, layer = "", -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, layer = prefix, rank
    return layer


def _target(module: str, package: str | None, level: int, name: str | None) -> str:
    """The module that ``from package import name`` (or ``import package`` when name is None) loads."""
    if level:
        base = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(level - 1):
            base = base.rpartition(".")[0]
        package = f"{base}.{package}" if package else base
    if name is not None and f"{package}.{name}" in MODULES:
        return f"{package}.{name}"
    return package


def _imports(module: str, body: list[ast.stmt], module_level: bool) -> list[tuple[str, int]]:
    """(imported ldm module, line) of the statements in ``body``; nested functions only if not ``module_level``."""
    found = []
    for node in body:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(_target(module, node.module, node.level, alias.name), node.lineno) for alias in node.names]
        elif isinstance(node, ast.If) and module_level and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and module_level:
            continue
        else:
            children = [n for n in ast.iter_child_nodes(node) if isinstance(n, (ast.stmt, ast.excepthandler))]
            found += _imports(module, children, module_level)
    return [(name, line) for name, line in found if name == "ldm" or name.startswith("ldm.")]


def _parsed(module: str) -> list[ast.stmt]:
    return ast.parse(MODULES[module].read_text(), str(MODULES[module])).body


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) < 0] == []


def test_no_module_imports_a_higher_layer():
    upward = {
        (module, imported, line)
        for module in MODULES
        for imported, line in _imports(module, _parsed(module), module_level=False)
        if _layer(imported) > _layer(module) and imported != "ldm"
    }
    assert sorted(item for item in upward if item[:2] not in KNOWN_UPWARD) == [], "(module, imported, line)"
    assert {item[:2] for item in upward} == KNOWN_UPWARD, "an exception in KNOWN_UPWARD is gone: remove it"


def test_no_import_cycle_at_module_level():
    graph = {m: sorted({i for i, _ in _imports(m, _parsed(m), module_level=True) if i in MODULES} - {m}) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in graph[module]:
            if state.get(imported) == 1:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, path + [imported])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []
