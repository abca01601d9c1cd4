"""Learnable quantizer scales for QAT (LSQ, Esser et al. 2020, arXiv 1902.08153), on modelopt quantizers.

Why hand-written: modelopt 0.47's INT8 fake quant (``fake_tensor_quant``) returns no gradient for
``amax`` and reads it through ``.data``; its LSQ mode exists only for block-wise NVFP4 quantizers. So
each quantizer keeps its ``amax`` buffer (what ONNX export reads) and a forward hook adds the LSQ
gradient path without changing the forward value::

    out' = out + (amax - amax.detach()) * d(out)/d(amax)      (the added term is 0 in value)

With ``s = amax / Q`` (``Q`` = 127, 255 unsigned), ``q = clamp(round(x / s))`` and ``out = s * q``, LSQ's
straight-through derivative is ``d out / d s = q - x / s`` where ``|x| <= amax`` and ``q`` where clipped,
i.e. ``d out / d amax = (out - x * inside) / amax``. The input gradient stays modelopt's (its default
STE passes it through everywhere, ``pass_through_bwd``).

The trained parameter is ``log(amax)`` (positive by construction, scale-free steps), one per shared
scale group (placement's concat/add groups stay tied, as the deployed graph needs), trained by Adam:
gradient magnitudes of ``amax`` vary by orders of magnitude between layers and Adam's normalised step
makes ``lr`` the relative change per step (1e-3 ~ 0.1 %). ``sync()`` copies ``exp(log_amax)`` into
the quantizers' ``amax`` buffers after every step, so checkpoints and exports see the trained scales.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from repquant.errors import RepquantError
from repquant.quant import _modelopt


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot contain dots


class LearnableScales(nn.Module):
    """``log(amax)`` parameters for the enabled, calibrated quantizers of ``qmodel``, tied per group.

    ``shared_groups``: groups of quantizer names that must keep one scale (``QuantPlacement.shared_groups``).
    Keys of ``log_amax`` are the first enabled member's name with dots as ``__``; ``members`` maps each
    key to its quantizer names. Call :meth:`remove` to take the hooks off.
    """

    def __init__(self, qmodel: nn.Module, shared_groups: Iterable[Iterable[str]] = ()) -> None:
        super().__init__()
        quantizers = {n: q for n, q in _modelopt.iter_quantizers(qmodel)
                      if q.is_enabled and getattr(q, "_amax", None) is not None}
        if not quantizers:
            raise RepquantError("learnable scales: the model has no enabled, calibrated quantizer")
        owner: dict[str, str] = {}
        for group in shared_groups:
            members = [n for n in group if n in quantizers]
            for name in members:
                owner[name] = members[0]
        self.log_amax = nn.ParameterDict()
        self.members: dict[str, list[str]] = {}
        self._quantizers = quantizers
        self._handles = []
        for name, quantizer in quantizers.items():
            head = owner.get(name, name)
            key = _key(head)
            if key not in self.log_amax:
                amax = quantizers[head].amax.detach().float()
                if not bool((amax > 0).all()):
                    raise RepquantError(f"learnable scales: {head} has a non-positive amax; recalibrate")
                self.log_amax[key] = nn.Parameter(amax.log().clone())
                self.members[key] = []
            if quantizer.amax.shape != self.log_amax[key].shape:
                raise RepquantError(f"learnable scales: {name} and {head} share a scale but have amax shapes "
                                    f"{tuple(quantizer.amax.shape)} and {tuple(self.log_amax[key].shape)}")
            self.members[key].append(name)
            self._handles.append(quantizer.register_forward_hook(partial(self._lsq_path, key)))

    def _lsq_path(self, key: str, quantizer: nn.Module, inputs: tuple[Any, ...], out: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled() or not quantizer.is_enabled or quantizer._if_calib:
            return None
        x = inputs[0]
        amax = self.log_amax[key].exp().to(out.dtype)
        with torch.no_grad():
            low = torch.zeros_like(amax) if quantizer.unsigned else -amax
            inside = (x >= low) & (x <= amax)
            slope = (out - torch.where(inside, x, torch.zeros_like(x))) / amax
        return out + (amax - amax.detach()) * slope

    @torch.no_grad()
    def sync(self) -> None:
        """Write ``exp(log_amax)`` into every member quantizer's ``amax`` buffer."""
        for key, names in self.members.items():
            amax = self.log_amax[key].exp()
            for name in names:
                self._quantizers[name].amax.copy_(amax.to(self._quantizers[name].amax.dtype))

    def amax(self) -> dict[str, Tensor]:
        """Current ``amax`` per quantizer name (detached)."""
        return {name: self.log_amax[key].detach().exp() for key, names in self.members.items() for name in names}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def scale_drift(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> dict[str, float]:
    """Summary of how far scales moved: mean / max ``|log(after / before)|`` over every element."""
    logs = torch.cat([(after[n].float() / before[n].float()).log().abs().flatten() for n in before])
    return {"mean_abs_log_ratio": float(logs.mean()), "max_abs_log_ratio": float(logs.max())}
