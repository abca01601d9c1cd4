"""RepOptimizer: gradient re-parameterization (Ding et al. 2022, arXiv 2205.15242; YOLOv6 RepOpt).

Two stages. (1) Hyper-search: train a ``block_mode='hyper_search'`` model whose 3x3 slots are
``LinearAddBlock``s, ReLU(BN(s_conv*conv3x3(x) + s_1x1*conv1x1(x) [+ s_id*x])), then keep only the
trained per-channel scales (:func:`extract_scales`, :func:`save_scales`). (2) Train the plain
``block_mode='repopt'`` model (``RealVGGBlock`` = ReLU(BN(conv3x3(x)))) with :class:`RepOptimizer`,
whose gradient masks (:func:`gradient_mask`) make SGD on the single conv follow, step for step, the
trajectory of SGD on the equivalent linear multi-branch block.

Why the masks are exact (paper Sec. 3, "Grad Mult"). For the linear block
``W' = s_conv*W_c + pad(s_1x1*W_1) + D`` (``D`` the trainable identity diagonal, initialised to
``s_id*I``), with ``G = dL/dW'`` the branch gradients are ``s_conv*G``, ``s_1x1*G[:, :, 1, 1]`` and
``diag(G[:, :, 1, 1])``. One SGD step on every branch moves ``W'`` by ``-lr * M*G`` with
``M[o, i, :, :] = s_conv[o]^2``, ``M[o, i, 1, 1] += s_1x1[o]^2``, ``M[c, c, 1, 1] += 1``. Weight
decay and (Nesterov) momentum are linear in the gradient, so they carry over exactly as long as
every branch parameter (identity diagonal included) gets the same decay: that is ``g*M + wd*W'``.
The identity term is ``+1``, not ``s_id^2``, because the identity branch's trainable parameter is the
diagonal itself (coefficient 1); the searched ``s_id`` enters only through the initialisation,
exactly as YOLOv6 ``RepVGGOptimizer.generate_gradient_masks``/``reinitialize`` do.

Scales are matched to the target model BY FULLY QUALIFIED BLOCK NAME AND SHAPE (YOLOv6 matched them by
traversal order, so a scales file from another variant silently produced wrong masks).
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from repquant.errors import CheckpointError, RepquantError
from repquant.io import read_safetensors, sniff_tensor_file, write_safetensors
from repquant.models.blocks import LinearAddBlock, RealVGGBlock
from repquant.reparam import identity_kernel, pad_kernel
from repquant.train.schedule import param_groups

SCALE_KINDS = ("scale_conv", "scale_1x1", "scale_identity")
SCALES_FILE_KIND = "repopt_scales"
SCALES_FORMAT_VERSION = "1"


# --- stage 1: scales out of a hyper-search model ------------------------------------------------


def extract_scales(model: nn.Module) -> dict[str, Tensor]:
    """Per-channel scales of every LinearAddBlock of a hyper-search model.

    Keys are ``"<fully qualified block name>.<kind>"`` with kind in :data:`SCALE_KINDS`
    (``scale_identity`` only for blocks with an identity branch, i.e. in == out and stride 1);
    values are detached float32 CPU tensors of shape ``(out_channels,)``. Pass the unwrapped model
    (not DDP). Raises ``RepquantError`` if the model holds no (un-deployed) LinearAddBlock.
    """
    scales: dict[str, Tensor] = {}
    for name, block in model.named_modules():
        if not isinstance(block, LinearAddBlock) or block.deployed:
            continue
        for kind in SCALE_KINDS:
            layer = getattr(block, kind, None)
            if layer is not None:
                scales[f"{name}.{kind}"] = layer.weight.detach().float().cpu().clone().contiguous()
    if not scales:
        raise RepquantError(f"extract_scales: {type(model).__name__} has no trainable LinearAddBlock; "
                            "scales come from a block_mode='hyper_search' model before reparameterization")
    return scales


def save_scales(path: str | os.PathLike, scales: Mapping[str, Tensor], model_name: str) -> None:
    """Write ``scales`` (from :func:`extract_scales`) to a safetensors file, atomically.

    Metadata records the file kind, format version and the variant name (``model_name``, e.g.
    ``"yolov6s"``) so a mismatch can be reported in the variant's terms.
    """
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in scales.items()}
    metadata = {"repquant_kind": SCALES_FILE_KIND, "format_version": SCALES_FORMAT_VERSION,
                "model_name": model_name}
    write_safetensors(path, tensors, metadata)


def load_scales(path: str | os.PathLike) -> tuple[dict[str, Tensor], str]:
    """Read a file written by :func:`save_scales` -> ``(scales, model_name)``.

    Raises ``CheckpointError`` naming the file if it is missing, not safetensors, or not a scales file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such scales file")
    if sniff_tensor_file(path) != "safetensors":
        raise CheckpointError(f"{path}: not a safetensors file (expected RepOpt scales from save_scales)")
    try:
        tensors, metadata = read_safetensors(path)
    except Exception as err:  # safetensors raises several types on corrupt input
        raise CheckpointError(f"{path}: unreadable safetensors file ({type(err).__name__}: {err})") from None
    if metadata.get("repquant_kind") != SCALES_FILE_KIND:
        raise CheckpointError(f"{path}: not a RepOpt scales file (metadata repquant_kind="
                              f"{metadata.get('repquant_kind')!r}, expected {SCALES_FILE_KIND!r})")
    return tensors, metadata.get("model_name", "unknown")


# --- stage 2: masks for a repopt model ----------------------------------------------------------


@dataclass(frozen=True)
class MatchedBlock:
    """One RealVGGBlock of the target model with its scales (each ``(out_channels,)``)."""

    name: str
    block: RealVGGBlock
    scale_conv: Tensor
    scale_1x1: Tensor
    scale_identity: Tensor | None


def _mismatch(source: str, detail: str) -> CheckpointError:
    return CheckpointError(f"{source}: scales do not match the model: {detail}")


def matched_blocks(model: nn.Module, scales: Mapping[str, Tensor],
                   source: str = "scales") -> list[MatchedBlock]:
    """Pair every trainable RealVGGBlock of ``model`` with its scales by name and shape.

    Checks, in model order, that each block has ``scale_conv`` and ``scale_1x1`` of shape
    ``(out_channels,)``, and ``scale_identity`` exactly when the block has an identity branch; then
    that no scale is left over. The first problem raises ``CheckpointError`` naming ``source`` (the
    scales file) and the layer.
    """
    found: list[MatchedBlock] = []
    used: set[str] = set()
    for name, block in model.named_modules():
        if not isinstance(block, RealVGGBlock):
            continue
        if block.deployed:
            raise RepquantError(f"RepOptimizer: block {name} is already reparameterized (deployed); "
                                "train the model before deploying it")
        expected = (block.out_channels,)
        kinds = SCALE_KINDS if block.has_identity else SCALE_KINDS[:2]
        got: dict[str, Tensor] = {}
        for kind in kinds:
            key = f"{name}.{kind}"
            if key not in scales:
                raise _mismatch(source, f"layer {name}: no {kind} in the file")
            if tuple(scales[key].shape) != expected:
                raise _mismatch(source, f"layer {name}.{kind}: shape {tuple(scales[key].shape)} in the file "
                                        f"vs {expected} in the model")
            got[kind] = scales[key].detach()
            used.add(key)
        if not block.has_identity and f"{name}.scale_identity" in scales:
            raise _mismatch(source, f"layer {name}: the file has scale_identity but the block has no "
                                    "identity branch")
        found.append(MatchedBlock(name, block, got["scale_conv"], got["scale_1x1"],
                                  got.get("scale_identity")))
    leftover = [k for k in scales if k not in used]
    if leftover:
        raise _mismatch(source, f"{leftover[0]} has no RealVGGBlock in the model "
                                f"({len(leftover)} scales unused)")
    if not found:
        raise RepquantError(f"RepOptimizer: {type(model).__name__} has no RealVGGBlock; "
                            "build it with block_mode='repopt'")
    return found


def gradient_mask(weight_shape: tuple[int, ...] | torch.Size, scale_conv: Tensor, scale_1x1: Tensor,
                  scale_identity: Tensor | None = None, groups: int = 1) -> Tensor:
    """RepOpt gradient multiplier for one ``(C_out, C_in/g, 3, 3)`` conv weight (module docstring).

    ``M[o, :, :, :] = s_conv[o]^2``; ``M[o, :, 1, 1] += s_1x1[o]^2``; with an identity branch
    (pass ``scale_identity``; only its presence matters, as in YOLOv6) ``+1`` at the identity taps.
    Returned in the dtype/device of ``scale_conv``.
    """
    out_channels, _, kh, kw = weight_shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"gradient_mask: expected a 3x3 kernel, got {kh}x{kw}")
    sc = scale_conv.reshape(-1, 1, 1, 1)
    s1 = scale_1x1.reshape(-1, 1, 1, 1)
    mask = torch.ones(weight_shape, dtype=scale_conv.dtype, device=scale_conv.device) * sc**2
    mask = mask + pad_kernel(torch.ones_like(mask[:, :, :1, :1]) * s1**2)
    if scale_identity is not None:
        mask = mask + identity_kernel(out_channels, groups, 3, dtype=mask.dtype, device=mask.device)
    return mask


def match_scales(model: nn.Module, scales: Mapping[str, Tensor],
                 source: str = "scales") -> dict[nn.Parameter, Tensor]:
    """Gradient masks for the RealVGGBlock convs of a repopt ``model``: ``{conv.weight: mask}``.

    Matching is by name and shape (:func:`matched_blocks`); ``source`` names the scales file in errors.
    Masks are float32 on the weight's device, shape equal to the weight's.
    """
    masks: dict[nn.Parameter, Tensor] = {}
    for m in matched_blocks(model, scales, source):
        weight = m.block.conv.weight
        s_id = None if m.scale_identity is None else m.scale_identity.float()
        mask = gradient_mask(weight.shape, m.scale_conv.float(), m.scale_1x1.float(), s_id, m.block.groups)
        masks[weight] = mask.to(weight.device)  # type: ignore[index]  # conv weights are Parameters
    return masks


@torch.no_grad()
def folded_gradient_masks(model: nn.Module, scales: Mapping[str, Tensor],
                          source: str = "scales") -> dict[str, Tensor]:
    """RepOpt masks for the BN-folded weights of a train-form repopt ``model``, by deployed parameter name.

    Deploying folds ``W_f = a * W`` with ``a = gamma / sqrt(running_var + eps)`` per output channel. With
    BN frozen (QAT fine-tunes the folded model), ``dL/dW = a * dL/dW_f``, so the RepOptimizer update
    ``W -= lr * (M * g_W + wd * W)`` is, on ``W_f``, ``W_f -= lr * (a^2 * M * g_Wf + wd * W_f)``: the
    mask becomes ``a^2 * M`` and weight decay and momentum carry over unchanged. Keys are
    ``"<block>.rbr_reparam.weight"``, the names the deployed model gives those convs; float64 on CPU
    (the optimizer casts a mask to its parameter's dtype).
    """
    masks: dict[str, Tensor] = {}
    for m in matched_blocks(model, scales, source):
        bn = m.block.bn
        assert bn.running_var is not None  # RealVGG blocks track running statistics
        fold = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).detach().cpu()
        s_id = None if m.scale_identity is None else m.scale_identity.double().cpu()
        mask = gradient_mask(m.block.conv.weight.shape, m.scale_conv.double().cpu(), m.scale_1x1.double().cpu(),
                             s_id, m.block.groups)
        masks[f"{m.name}.rbr_reparam.weight"] = mask * fold.reshape(-1, 1, 1, 1) ** 2
    return masks


@torch.no_grad()
def init_from_scales(model: nn.Module, scales: Mapping[str, Tensor], seed: int = 0,
                     source: str = "scales") -> None:
    """Re-initialise each RealVGGBlock conv as the merged hyper-search block (training from scratch only).

    ``W = s_conv*W0 + pad(s_1x1*U) + pad(s_id*I)`` per output channel, where ``W0`` is the conv's
    current (random) initialisation and ``U`` a seeded 1x1 kernel drawn like PyTorch's default conv
    init, ``Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (YOLOv6 ``reinitialize`` with
    ``use_identity_scales_for_reinit=True``). Do not call it when fine-tuning pretrained weights.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in matched_blocks(model, scales, source):
        weight = m.block.conv.weight
        out_channels, fan_in = weight.shape[:2]  # fan_in of the imaginary 1x1 branch: (C_in / groups) * 1 * 1
        u = torch.rand(out_channels, fan_in, 1, 1, generator=gen, dtype=torch.float64) * 2 - 1
        u = (u / math.sqrt(fan_in)).to(device=weight.device, dtype=weight.dtype)
        new = weight * _column(m.scale_conv, weight) + pad_kernel(u) * _column(m.scale_1x1, weight)
        if m.scale_identity is not None:
            eye = identity_kernel(out_channels, m.block.groups, 3, dtype=weight.dtype, device=weight.device)
            new = new + eye * _column(m.scale_identity, weight)
        weight.copy_(new)


def _column(scale: Tensor, like: Tensor) -> Tensor:
    """``(C,)`` scale -> ``(C, 1, 1, 1)`` in ``like``'s dtype and device, to scale output channels."""
    return scale.to(device=like.device, dtype=like.dtype).reshape(-1, 1, 1, 1)


# --- the optimizer ------------------------------------------------------------------------------


class RepOptimizer(torch.optim.SGD):
    """SGD whose step first multiplies the gradient of each masked parameter by its mask.

    Per parameter, in YOLOv6 ``RepVGGOptimizer.step`` order: ``g <- g*M`` (masked parameters only),
    ``g <- g + wd*W`` (the group's weight decay), then torch SGD's momentum/dampening/Nesterov and
    ``W <- W - lr*g``. The mask is applied to ``p.grad`` IN PLACE (as a gradient hook would), so
    gradient clipping must happen before ``step``; AMP ``GradScaler.step`` unscales first, which is fine.

    ``masks`` maps parameters (the same objects passed in ``params``) to tensors of their shape; masks
    follow the parameter to its device/dtype lazily. ``state_dict``/``load_state_dict`` are SGD's
    (momentum buffers); masks are not saved: rebuild them from the scales file on resume.
    """

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict], masks: Mapping[nn.Parameter, Tensor],
                 lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov)
        in_groups = {id(p) for group in self.param_groups for p in group["params"]}
        self.grad_masks: dict[nn.Parameter, Tensor] = {}
        for p, mask in masks.items():
            if id(p) not in in_groups:
                raise RepquantError(f"RepOptimizer: a masked parameter of shape {tuple(p.shape)} is not in "
                                    "any parameter group")
            if mask.shape != p.shape:
                raise RepquantError(f"RepOptimizer: mask shape {tuple(mask.shape)} vs parameter shape "
                                    f"{tuple(p.shape)}")
            self.grad_masks[p] = mask.detach().to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Multiply each masked parameter's gradient by its mask, in place (the first part of ``step``)."""
        grads, masks = [], []
        for p, mask in self.grad_masks.items():
            if p.grad is None:
                continue
            if mask.device != p.grad.device or mask.dtype != p.grad.dtype:
                mask = self.grad_masks[p] = mask.to(device=p.grad.device, dtype=p.grad.dtype)
            grads.append(p.grad)
            masks.append(mask)
        if grads:
            torch._foreach_mul_(grads, masks)  # one fused launch per device/dtype instead of one per layer

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.apply_masks()
        # SGD.step without torch's profiling/hook wrapper: once another SGD exists, SGD.step is wrapped
        # too, and calling it as is would run this optimizer's step hooks a second time.
        sgd_step: typing.Any = torch.optim.SGD.step
        if getattr(sgd_step, "hooked", False):
            sgd_step = sgd_step.__wrapped__
        sgd_step(self)
        return loss


def build_repopt_optimizer(model: nn.Module, masks: Mapping[nn.Parameter, Tensor], lr0: float,
                           momentum: float, weight_decay: float, nesterov: bool = True) -> RepOptimizer:
    """RepOptimizer over the trainer's three YOLOv6 groups (``repquant.train.schedule.param_groups``).

    Group 0 BN weights (no decay), 1 conv/linear weights (``weight_decay``: the masked RealVGGBlock
    convs are here, as in YOLOv6), 2 biases (no decay); Nesterov as YOLOv6. Each group records
    ``initial_lr = lr0`` for the epoch schedule and warm-up. A drop-in for ``schedule.build_optimizer``.
    """
    bn_w, w, b = param_groups(model)
    decayed = {id(p) for p in w}
    for p in masks:
        if id(p) not in decayed:
            raise RepquantError(f"build_repopt_optimizer: a masked weight of shape {tuple(p.shape)} is not "
                                "in the weight-decay group")
    optimizer = RepOptimizer(
        [{"params": bn_w, "weight_decay": 0.0}, {"params": w, "weight_decay": weight_decay},
         {"params": b, "weight_decay": 0.0}],
        masks, lr=lr0, momentum=momentum, weight_decay=0.0, nesterov=nesterov,
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = lr0
    return optimizer
