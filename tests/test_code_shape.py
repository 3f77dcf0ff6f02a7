"""The code keeps the shape docs/architecture.md describes: functions short enough to see whole.

Read from the source (the AST), nothing imported: no function in ``ldm/`` runs over 100 lines, and
a generation call (``Pipeline.__call__`` and ``Pipeline.generate``) stays a short sequence of stages.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ldm"
MAX_FUNCTION_LINES = 100
MAX_CALL_LINES = 60


def _functions() -> dict[str, int]:
    """'path:line name' -> lines, for every function and method in ldm/."""
    lengths = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_no_function_in_ldm_is_over_100_lines():
    lengths = _functions()
    assert len(lengths) > 500  # the walk found the package
    assert {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES} == {}


def test_a_generation_call_is_a_short_sequence_of_stages():
    lengths = {name.split(" ")[-1]: n for name, n in _functions().items() if name.startswith("ldm/pipeline/pipeline.py")}
    assert lengths["__call__"] <= MAX_CALL_LINES and lengths["generate"] <= MAX_CALL_LINES
