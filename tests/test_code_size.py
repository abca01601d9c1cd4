"""House-style limits that keep every module readable (issue 18): no file in ``repquant/`` over 400 lines, no
function over 60 lines, no public function with more than 8 parameters (workflows take one config)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "repquant"
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_PUBLIC_PARAMS = 400, 60, 8
FILES = sorted(PKG.rglob("*.py"))


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs] if a.arg not in ("self", "cls")]
    return names + (["*" + args.vararg.arg] if args.vararg else [])


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_file_and_function_sizes(path: Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_FILE_LINES, f"{path.name}: {len(source.splitlines())} lines"
    for node in _functions(ast.parse(source)):
        length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
        assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name}: {length} lines"
        if not node.name.startswith("_"):
            params = _params(node)
            assert len(params) <= MAX_PUBLIC_PARAMS, f"{path.name}:{node.lineno} {node.name}: {len(params)} params"


def test_the_limits_can_fail(tmp_path: Path) -> None:
    """The checks above look at what they should: a long, wide function is caught."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"def wide(a, b, c, d, e, f, g, h, i):\n{body}\n")
    [node] = _functions(tree)
    assert node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES  # type: ignore[operator]
    assert len(_params(node)) > MAX_PUBLIC_PARAMS
