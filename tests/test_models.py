"""Model registry, configs, output contract, anchors and box decoding."""

from __future__ import annotations

import json

import pytest
import torch

from repquant.errors import ModelError
from repquant.models import (
    DecodedDetector,
    ModelConfig,
    create_model,
    decode_boxes,
    get_config,
    list_models,
    make_anchors,
)
from repquant.reparam import reparameterize

ALL_VARIANTS = [
    "yolov6n",
    "yolov6s",
    "yolov6m",
    "yolov6l",
    "yolov6n-qa",
    "yolov6s-qa",
    "yolov6m-qa",
    "yolov6n-v2",
    "yolov6t-v2",
    "yolov6s-v2",
    "yolov6m-v2",
    "yolov6l-v2",
]


def test_registry_lists_all_variants():
    assert sorted(ALL_VARIANTS) == list_models()


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError) as err:
        create_model("yolov6x")
    message = str(err.value)
    assert "yolov6x" in message and all(name in message for name in ALL_VARIANTS)
    assert "\n" not in message


@pytest.mark.parametrize("kwargs", [{"block_mode": "dbb"}, {"num_classes": 0}])
def test_invalid_options_raise_model_error(kwargs):
    with pytest.raises(ModelError):
        create_model("yolov6n", **kwargs)


def test_config_round_trips_through_json():
    config = create_model("yolov6m", num_classes=7, block_mode="hyper_search").config
    restored = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config and restored.csp_e == 2 / 3 and restored.num_classes == 7
    with pytest.raises(ModelError, match="unknown keys"):
        ModelConfig.from_dict({**config.to_dict(), "widht": 1.0})


def test_config_is_frozen_and_defaults():
    config = get_config("yolov6l")
    with pytest.raises(AttributeError):
        config.num_classes = 3  # type: ignore[misc]
    assert (config.block_mode, config.reg_max, config.strides) == ("conv_silu", 16, (8, 16, 32))
    assert get_config("yolov6s").reg_max == 0 and get_config("yolov6s").block_mode == "repvgg"


def test_scaling_rules():
    # channels ceil(c * w / 8) * 8; repeats max(round(n * d), 1) if n > 1 else n
    config = get_config("yolov6t-v2")
    assert config.channels == [24, 48, 96, 192, 384, 96, 48, 48, 96, 96, 192]
    assert config.repeats == [1, 2, 4, 6, 2, 4, 4, 4, 4]


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_output_contract(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3)
    x = torch.rand(1, 3, 64, 96)
    num_anchors = sum((64 // s) * (96 // s) for s in (8, 16, 32))
    reg_channels = 4 * (model.config.reg_max + 1)
    with torch.no_grad():
        neck_out = model.neck(model.backbone(x))
        assert isinstance(neck_out, tuple) and len(neck_out) == 3
        ch = model.config.channels
        assert [t.shape[1] for t in neck_out] == [ch[6], ch[8], ch[10]]
        assert [t.shape[-2:] for t in neck_out] == [(8, 12), (4, 6), (2, 3)]
        model.train()
        outputs = [model(x)]
        model.eval()
        outputs.append(model(x))
        reparameterize(model)
        outputs.append(model(x))
    for cls_logits, reg_dist in outputs:
        assert cls_logits.shape == (1, num_anchors, 3)
        assert reg_dist.shape == (1, num_anchors, reg_channels)


def test_anchor_order_is_level_then_row_major():
    points, strides = make_anchors((64, 32), (8, 16, 32))
    assert points.shape == (8 * 4 + 4 * 2 + 2 * 1, 2) and strides.shape == (42, 1)
    assert points[:3].tolist() == [[4, 4], [12, 4], [20, 4]]  # x moves fastest
    assert points[4].tolist() == [4, 12]
    assert points[32].tolist() == [8, 8] and strides[32].item() == 16
    assert points[-1].tolist() == [16, 48] and strides[-1].item() == 32


def test_decode_boxes_known_answer_without_dfl():
    points, strides = make_anchors((32, 32), (8, 16, 32))
    reg = torch.zeros(1, points.shape[0], 4)
    reg[0, 0] = torch.tensor([1.0, 0.5, 2.0, 3.0])  # anchor (4, 4), stride 8
    boxes = decode_boxes(reg, points, strides, reg_max=0)
    assert boxes[0, 0].tolist() == [-4.0, 0.0, 20.0, 28.0]
    assert boxes[0, -1].tolist() == [16.0, 16.0, 16.0, 16.0]  # zero distances: the anchor point


def test_decode_boxes_dfl_expectation():
    reg_max = 16
    points, strides = make_anchors((32, 32), (8, 16, 32))
    logits = torch.zeros(1, points.shape[0], 4, reg_max + 1)  # uniform bins: mean 8
    logits[0, 0, 0, 3] = 100.0  # anchor 0, left side: all mass on bin 3
    boxes = decode_boxes(logits.flatten(2), points, strides, reg_max)
    assert torch.allclose(boxes[0, 0], torch.tensor([4 - 3 * 8.0, 4 - 64.0, 4 + 64.0, 4 + 64.0]))


@pytest.mark.parametrize("name", ["yolov6n", "yolov6m"])
def test_decoded_detector_matches_functions(name):
    torch.manual_seed(1)
    model = create_model(name, num_classes=4).eval()
    for conv in model.head.reg_preds:
        torch.nn.init.normal_(conv.weight, std=0.1)
    detector = DecodedDetector(model, (64, 64)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        boxes, scores = detector(x)
        cls_logits, reg_dist = model(x)
    points, strides = make_anchors((64, 64))
    assert torch.allclose(boxes, decode_boxes(reg_dist, points, strides, model.config.reg_max), atol=1e-4)
    assert torch.allclose(scores, cls_logits.sigmoid())
    assert scores.shape == (2, 84, 4) and (scores >= 0).all() and (scores <= 1).all()
    if model.config.reg_max:
        assert isinstance(detector.dfl_proj, torch.nn.Module)
        assert not any(isinstance(m, torch.nn.Conv2d) for m in detector.dfl_proj.modules())
    with pytest.raises(ModelError):
        detector(torch.rand(1, 3, 96, 64))
