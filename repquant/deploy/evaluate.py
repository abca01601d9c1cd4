"""`repquant eval`: COCO mAP of a torch checkpoint or an exported ONNX model through one postprocess path."""

from __future__ import annotations

import os
from pathlib import Path

from repquant.data import DetectionDataset, load_data_config
from repquant.errors import RepquantError
from repquant.eval import EvalResult, evaluate


def _onnx_predictor(path: Path, img_size: int | None, threads: int | None):
    from repquant.deploy.ort import OrtDetector

    detector = OrtDetector(path, intra_op_threads=threads)
    if detector.img_size is None and img_size is None:
        raise RepquantError(f"{path}: ONNX file has no repquant metadata; pass --img-size")
    size = img_size or detector.img_size[0]
    if detector.img_size is not None and detector.img_size != (size, size):
        raise RepquantError(f"{path}: exported for {detector.img_size[0]}x{detector.img_size[1]}, not {size}")
    return detector, size, detector.batch_size


def _torch_predictor(path: str, img_size: int | None, device: str):
    from repquant.checkpoint import load_checkpoint, resolve_model
    from repquant.models import DecodedDetector
    from repquant.quant.qat import is_quantized_checkpoint, load_quantized_model

    if is_quantized_checkpoint(path):  # QAT output: evaluate the fake-quant model
        model = load_quantized_model(path)[0].to(device).eval()
    else:
        model = resolve_model(path).float().to(device).eval()
    if img_size is None:
        _, metadata = load_checkpoint(path)
        img_size = int(metadata.get("img_size") or metadata.get("recipe", {}).get("img_size") or 640)
    return DecodedDetector(model, (img_size, img_size)).eval(), img_size


def evaluate_model(
    model_path: str | os.PathLike,
    data_yaml: str | os.PathLike,
    split: str = "val",
    img_size: int | None = None,
    batch_size: int = 8,
    conf_thres: float = 0.03,
    iou_thres: float = 0.65,
    threads: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[EvalResult, int]:
    """mAP of ``model_path`` (checkpoint or ``.onnx``) on a split of the dataset; returns (result, img_size).

    Both backends feed the same letterboxed images to the same :func:`repquant.eval.evaluate`, so torch and
    ONNX Runtime numbers are directly comparable. The image size defaults to the one recorded with the model.
    """
    path = Path(model_path)
    if not path.is_file():
        raise RepquantError(f"{path}: no such model file")
    if path.suffix == ".onnx":
        predict_fn, size, static_batch = _onnx_predictor(path, img_size, threads)
        batch_size = static_batch or batch_size
    else:
        predict_fn, size = _torch_predictor(str(path), img_size, device)
    data = load_data_config(data_yaml)
    dataset = DetectionDataset(data, split, img_size=size, augment=False)
    result = evaluate(predict_fn, dataset, batch_size=batch_size, conf_thres=conf_thres,
                      iou_thres=iou_thres, progress=progress)
    return result, size
