"""ONNX files of a model: the fp32 export and its static int8 quantisation.

Why a module of its own: exporting and quantising run once per model (at registration, or on
first use of an older version), need onnx and onnxruntime's quantisation tools, and nothing
at tagging time calls them.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from multitag.inference.records import FastPathError

ONNX_OPSET = 17


def export_onnx(model: Any, path: Path, img_size: int, *, opset: int = ONNX_OPSET) -> Path:
    """Export a torch model (normalised float NCHW in, logits out) with a dynamic batch axis.

    The TorchScript exporter (`dynamo=False`): it folds BatchNorm into the convolutions in
    eval mode and needs no tracing of fastai's Python, in ~1 s for resnet50.
    """
    import torch

    model = model.eval()
    dummy = torch.zeros(2, 3, img_size, img_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


class _BatchReader:
    """onnxruntime CalibrationDataReader over normalised calibration batches."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {"input": batch}


class _Rank1AxisFilter(logging.Filter):
    """ORT logs 'Axis 1 is out-of-range for weight ... with rank 1' for the head's BatchNorm1d
    weights, which it then quantises per tensor, as intended: noise in every run's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()


@contextlib.contextmanager
def _quiet_rank1_axis_warnings() -> Iterator[None]:
    root, flt = logging.getLogger(), _Rank1AxisFilter()
    handlers = list(root.handlers)
    for h in handlers:
        h.addFilter(flt)
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)
        for h in handlers:
            h.removeFilter(flt)


def head_nodes(onnx_path: Path) -> list[str]:
    """The classifier head's MatMul/Gemm nodes: those after the network's last Conv.

    Why keep them in fp32: they write the logits the thresholds act on, so their rounding
    error reaches the decisions undamped, while their share of the compute is negligible
    (two small matrix products in fastai's head). Measured on a partly trained resnet50 and
    shapes_cnn (validation decisions vs torch fp32): flips 18 -> 8 of 1,536 and 53 -> 44 of
    6,000, speed unchanged. A network without Conv layers has no such head: nothing excluded.
    """
    import onnx

    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    last_conv = max((i for i, n in enumerate(nodes) if n.op_type == "Conv"), default=None)
    if last_conv is None:
        return []
    return [n.name for n in nodes[last_conv + 1 :] if n.op_type in ("MatMul", "Gemm")]


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> Path:
    """Static int8 quantisation (QDQ, per-channel weights, MinMax activations, head in fp32).

    `calibration`: normalised float32 (N, 3, H, W) images like the ones to tag; activation
    ranges come from them, so they must be real images, not noise. MinMax was kept after
    measuring Percentile (99.99), Entropy, moving-average MinMax, symmetric activations and
    256 instead of 64 calibration images: none made fewer flips (see benchmarks/RESULTS.md).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration.ndim != 4 or len(calibration) == 0:
        raise FastPathError(f"calibration needs (N, 3, H, W) images; got {calibration.shape}")
    batches = [calibration[i : i + 16] for i in range(0, len(calibration), 16)]
    with (
        tempfile.TemporaryDirectory(prefix="multitag-quant-") as tmp,
        _quiet_rank1_axis_warnings(),
    ):
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out_path),
            _BatchReader(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=head_nodes(pre),
        )
    return out_path
