"""Enforce the one-way dependency flow of the package (DESIGN.md) by parsing imports with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "repquant"

# Lower rank may never import higher rank. Same rank may import each other, except the pairs in PEERS.
RANK = {
    "errors": 0, "io": 0, "recipe": 0, "vocab": 0, "outputs": 0,
    "ops": 1, "reparam": 1,
    "models": 2, "checkpoint": 2, "modelfile": 2, "official": 2, "provenance": 2,
    "data": 3,
    "train": 4, "eval": 4, "quant": 4,
    "deploy": 5,
    "tasks": 6,
    "cli": 7, "__main__": 7, "__init__": 7,
}
# Same-floor components that must not import each other: quant and train are peers (QAT is a task that
# builds quantized-model parts and runs them on the one training loop).
PEERS = {("quant", "train"), ("train", "quant")}
# Heavy or optional third-party packages, and the only modules allowed to import them.
OWNERS = {
    "modelopt": {"quant/_modelopt.py"},
    "tensorrt": {"deploy/tensorrt.py", "deploy/tensorrt_runner.py"},  # the engine builder and its runner
    "openvino": {"deploy/backends/openvino.py"},
    "nncf": set(),
    "pycuda": {"deploy/tensorrt.py"},
    "torchvision": set(),
}


def _component(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def _source_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py"))


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    rel_parts = path.relative_to(PKG.parent).with_suffix("").parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel_parts[: len(rel_parts) - node.level])
                if path.name == "__init__.py":
                    base = list(rel_parts[: len(rel_parts) - node.level + 1])
                mod = ".".join(base + ([node.module] if node.module else []))
                names.append(mod)
            elif node.module:
                names.append(node.module)
    return names


def _own_component(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize("path", _source_files(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_flow_one_way(path: Path) -> None:
    own = _own_component(path)
    assert own in RANK, f"{path}: component {own!r} has no rank in tests/test_layering.py"
    for name in _imports(path):
        if name.split(".")[0] != "repquant" or name == "repquant":
            continue
        target = _component(name)
        assert target in RANK, f"{path}: imports unknown component {name}"
        assert RANK[target] <= RANK[own], f"{path}: {own} (rank {RANK[own]}) imports {name} (rank {RANK[target]})"
        assert (own, target) not in PEERS, f"{path}: {own} imports {name}; {own} and {target} are peers"


@pytest.mark.parametrize("path", _source_files(), ids=lambda p: str(p.relative_to(PKG)))
def test_heavy_imports_have_one_owner(path: Path) -> None:
    rel = str(path.relative_to(PKG))
    for name in _imports(path):
        top = name.split(".")[0]
        if top in OWNERS:
            assert rel in OWNERS[top], f"{rel} imports {top}; only {sorted(OWNERS[top])} may"
