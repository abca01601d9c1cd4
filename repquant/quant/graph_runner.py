"""Run a traced model node by node with module/function substitutes and a value cache.

The sensitivity sweep runs the float model once per batch and keeps every node's value; a quantized
layer's isolated run recomputes only the nodes downstream of it, reading the rest from that cache.
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from repquant.quant.placement import trace

Substitute = Callable[[tuple[Any, ...], dict[str, Any]], Any]


class GraphRunner:
    """Runs a traced model node by node, with module/function substitutes and a value cache."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graph = trace(model)
        self.nodes = list(self.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.modules = {name: _out_of_place(m) for name, m in model.named_modules()}
        self.output = next(n for n in self.nodes if n.op == "output")

    def descendants(self, roots: Iterable[fx.Node]) -> list[fx.Node]:
        """``roots`` and every node reading them, in execution order (incl. the output node)."""
        seen: set[fx.Node] = set()
        stack = list(roots)
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(n.users)
        return sorted(seen, key=self.order.__getitem__)

    def _attr(self, target: str) -> Any:
        return functools.reduce(getattr, target.split("."), self.model)

    def run(self, x: Tensor, subs: dict[fx.Node, Substitute], nodes: Sequence[fx.Node] | None = None,
            cache: dict[fx.Node, Any] | None = None) -> dict[fx.Node, Any]:
        """Values of ``nodes`` (default: all); inputs outside ``nodes`` are read from ``cache``.

        The output node's value is the tuple/tensor the model returns.
        """
        env: dict[fx.Node, Any] = {}

        def lookup(n: fx.Node) -> Any:
            return env[n] if n in env else cache[n]  # type: ignore[index]

        for node in self.nodes if nodes is None else nodes:
            args = fx.node.map_arg(node.args, lookup)
            kwargs = fx.node.map_arg(node.kwargs, lookup)
            if node in subs:
                env[node] = subs[node](args, kwargs)
            elif node.op == "placeholder":
                env[node] = x
            elif node.op == "get_attr":
                env[node] = self._attr(str(node.target))
            elif node.op == "call_module":
                env[node] = self.modules[str(node.target)](*args, **kwargs)
            elif node.op == "call_function":
                env[node] = function_of(node.target)(*args, **_no_inplace(kwargs))
            elif node.op == "call_method":
                method = str(node.target)
                method = method[:-1] if method.endswith("_") and not method.endswith("__") else method
                env[node] = getattr(args[0], method)(*args[1:], **_no_inplace(kwargs))
            elif node.op == "output":
                env[node] = args[0]
        return env


# Cached values must stay what the node produced: an in-place activation (``SiLU(inplace=True)``)
# would overwrite the conv output the cache holds, so every op runs out of place.
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub,
                 operator.itruediv: operator.truediv}


def function_of(target: Any) -> Any:
    return _OUT_OF_PLACE.get(target, target)


def _no_inplace(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**kwargs, "inplace": False} if kwargs.get("inplace") else kwargs


def _out_of_place(module: nn.Module) -> nn.Module:
    if getattr(module, "inplace", False) is True:
        module = copy.copy(module)  # shallow: shares parameters, only the flag differs
        setattr(module, "inplace", False)  # noqa: B010  (an attribute of some activations only)
    return module
