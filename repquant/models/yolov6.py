"""YOLOv6 variants as data (one frozen ``ModelConfig`` each) and the ``YOLOv6`` network.

Architecture facts from the official configs (``configs/yolov6{n,s,m,l}.py`` for v3.0; v2.0 from
``configs/repopt`` and the release history) and ``yolov6/models/yolo.py::build_network``:
channels ``ceil(c * width / 8) * 8``, repeats ``max(round(n * depth), 1) if n > 1 else n``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from repquant.errors import ModelError
from repquant.models import backbone as backbones
from repquant.models import neck as necks
from repquant.models.blocks import block_factory, block_mode_names
from repquant.models.head import EffiDeHead
from repquant.models.registry import get_config, register

BACKBONE_REPEATS = (1, 6, 12, 18, 6)
BACKBONE_CHANNELS = (64, 128, 256, 512, 1024)
NECK_REPEATS = (12, 12, 12, 12)
NECK_CHANNELS = (256, 128, 128, 256, 256, 512)
_BACKBONES = {"EfficientRep", "CSPBepBackbone"}
_NECKS = {"RepPANNeck", "CSPRepPANNeck", "RepBiFPANNeck", "CSPRepBiFPANNeck"}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network; JSON-serializable via ``to_dict`` (stored in checkpoints).

    ``block_mode`` is the training form of the 3x3 RepVGG-style slots: repvgg | qarepvgg | repopt
    (RealVGGBlock) | hyper_search (LinearAddBlock) | conv_silu (plain Conv+BN+SiLU, YOLOv6-L).
    ``reg_max`` 0 means direct distance regression (no DFL).
    """

    name: str
    version: str
    depth_multiple: float
    width_multiple: float
    backbone: str
    neck: str
    num_classes: int = 80
    reg_max: int = 0
    block_mode: str = "repvgg"
    strides: tuple[int, ...] = (8, 16, 32)
    fuse_p2: bool = False
    cspsppf: bool = False
    csp_e: float | None = None
    backbone_repeats: tuple[int, ...] = BACKBONE_REPEATS
    backbone_channels: tuple[int, ...] = BACKBONE_CHANNELS
    neck_repeats: tuple[int, ...] = NECK_REPEATS
    neck_channels: tuple[int, ...] = NECK_CHANNELS

    def __post_init__(self) -> None:
        problems = []
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if self.reg_max < 0:
            problems.append(f"reg_max must be >= 0, got {self.reg_max}")
        if self.block_mode not in block_mode_names():
            problems.append(f"block_mode {self.block_mode!r} not in {', '.join(block_mode_names())}")
        if self.backbone not in _BACKBONES or self.neck not in _NECKS:
            problems.append(f"unknown backbone/neck {self.backbone}/{self.neck}")
        if ("CSP" in self.backbone or "CSP" in self.neck) and self.csp_e is None:
            problems.append("CSP backbone/neck needs csp_e")
        if ("BiFPAN" in self.neck) != self.fuse_p2:
            problems.append("BiFPAN necks need fuse_p2=True (and only they)")
        if tuple(self.strides) != (8, 16, 32):
            problems.append(f"strides must be (8, 16, 32), got {tuple(self.strides)}")
        if problems:
            raise ModelError(f"model config {self.name!r}: {'; '.join(problems)}")

    @property
    def channels(self) -> list[int]:
        """The 11 scaled widths: 5 backbone then 6 neck."""
        return [
            math.ceil(c * self.width_multiple / 8) * 8 for c in self.backbone_channels + self.neck_channels
        ]

    @property
    def repeats(self) -> list[int]:
        """The 9 scaled depths: 5 backbone then 4 neck."""
        return [
            max(round(n * self.depth_multiple), 1) if n > 1 else n
            for n in self.backbone_repeats + self.neck_repeats
        ]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ModelError(f"model config: unknown keys {', '.join(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            return cls(**values)
        except TypeError as err:
            raise ModelError(f"model config: {err}") from None


_V3: dict[str, Any] = {"version": "v3.0", "fuse_p2": True}
_V2: dict[str, Any] = {"version": "v2.0"}
YOLOV6N = register(
    ModelConfig(
        "yolov6n",
        depth_multiple=0.33,
        width_multiple=0.25,
        backbone="EfficientRep",
        neck="RepBiFPANNeck",
        cspsppf=True,
        **_V3,
    )
)
YOLOV6S = register(
    ModelConfig(
        "yolov6s",
        depth_multiple=0.33,
        width_multiple=0.50,
        backbone="EfficientRep",
        neck="RepBiFPANNeck",
        cspsppf=True,
        **_V3,
    )
)
YOLOV6M = register(
    ModelConfig(
        "yolov6m",
        depth_multiple=0.60,
        width_multiple=0.75,
        backbone="CSPBepBackbone",
        neck="CSPRepBiFPANNeck",
        csp_e=2 / 3,
        reg_max=16,
        **_V3,
    )
)
YOLOV6L = register(
    ModelConfig(
        "yolov6l",
        depth_multiple=1.0,
        width_multiple=1.0,
        backbone="CSPBepBackbone",
        neck="CSPRepBiFPANNeck",
        csp_e=1 / 2,
        reg_max=16,
        block_mode="conv_silu",
        **_V3,
    )
)
# configs/qarepvgg of the official code: the v3.0 N/S/M architectures trained with QARepVGGBlockV2.
YOLOV6N_QA = register(dataclasses.replace(YOLOV6N, name="yolov6n-qa", block_mode="qarepvggv2"))
YOLOV6S_QA = register(dataclasses.replace(YOLOV6S, name="yolov6s-qa", block_mode="qarepvggv2"))
YOLOV6M_QA = register(dataclasses.replace(YOLOV6M, name="yolov6m-qa", block_mode="qarepvggv2"))
YOLOV6N_V2 = register(
    ModelConfig(
        "yolov6n-v2",
        depth_multiple=0.33,
        width_multiple=0.25,
        backbone="EfficientRep",
        neck="RepPANNeck",
        **_V2,
    )
)
YOLOV6T_V2 = register(
    ModelConfig(
        "yolov6t-v2",
        depth_multiple=0.33,
        width_multiple=0.375,
        backbone="EfficientRep",
        neck="RepPANNeck",
        **_V2,
    )
)
YOLOV6S_V2 = register(
    ModelConfig(
        "yolov6s-v2",
        depth_multiple=0.33,
        width_multiple=0.50,
        backbone="EfficientRep",
        neck="RepPANNeck",
        **_V2,
    )
)
YOLOV6M_V2 = register(
    ModelConfig(
        "yolov6m-v2",
        depth_multiple=0.60,
        width_multiple=0.75,
        backbone="CSPBepBackbone",
        neck="CSPRepPANNeck",
        csp_e=2 / 3,
        reg_max=16,
        **_V2,
    )
)
YOLOV6L_V2 = register(
    ModelConfig(
        "yolov6l-v2",
        depth_multiple=1.0,
        width_multiple=1.0,
        backbone="CSPBepBackbone",
        neck="CSPRepPANNeck",
        csp_e=1 / 2,
        reg_max=16,
        block_mode="conv_silu",
        **_V2,
    )
)


class YOLOv6(nn.Module):
    """backbone -> neck -> head. ``forward(x (B, 3, H, W) in [0, 1])`` returns the raw tensors
    ``(cls_logits (B, A, nc), reg_dist (B, A, 4*(reg_max+1)))`` in train, eval and deployed form."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        ch, n = config.channels, config.repeats
        block = block_factory(config.block_mode)
        conv_silu = config.block_mode == "conv_silu"
        common = dict(fuse_p2=config.fuse_p2, cspsppf=config.cspsppf, conv_silu=conv_silu)
        if config.backbone == "CSPBepBackbone":
            assert config.csp_e is not None  # checked by ModelConfig
            self.backbone: nn.Module = backbones.CSPBepBackbone(ch, n, block, config.csp_e, **common)
        else:
            self.backbone = backbones.EfficientRep(ch, n, block, **common)
        neck_cls = getattr(necks, config.neck)
        extra = {"csp_e": config.csp_e} if "CSP" in config.neck else {}
        self.neck: nn.Module = neck_cls(ch, n, block, conv_silu=conv_silu, **extra)
        self.head = EffiDeHead((ch[6], ch[8], ch[10]), config.num_classes, config.reg_max)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.neck(self.backbone(x)))


def create_model(name: str, num_classes: int = 80, block_mode: str | None = None) -> YOLOv6:
    """Build variant ``name`` (see ``list_models()``) with ``num_classes`` and optional ``block_mode``.

    ``block_mode=None`` keeps the variant's own (repvgg, or conv_silu for the L models).
    """
    base = get_config(name)
    changes: dict[str, Any] = {"num_classes": num_classes}
    if block_mode is not None:
        changes["block_mode"] = block_mode
    return YOLOv6(dataclasses.replace(base, **changes))
