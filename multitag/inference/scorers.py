"""The scorer interface, the ONNX Runtime scorer, and the factory over every candidate.

Why a module of its own: a Tagger takes any `Scorer`; which one (torch fp32 or bf16, ONNX
fp32 or int8, the compiled bf16 package) is decided before the Tagger is built
(multitag.inference.loading), and this is the one place that turns a candidate's name and
file into a scorer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from multitag.inference.aoti import AotiScorer
from multitag.inference.arrays import normalise_batch, sigmoid
from multitag.inference.records import (
    AOTI_BF16,
    ORT_FP32,
    ORT_INT8,
    TORCH_BF16,
    TORCH_FP32,
    FastPathError,
    FastPathRecord,
    record_dir,
)
from multitag.inference.torch_scorer import TorchScorer, bf16_scorer, program_bf16_scorer
from multitag.runtime import available_cpus


class Scorer(Protocol):
    """Anything that turns a batch of model-ready images into per-label probabilities.

    `images`: uint8 (N, H, W, 3) RGB, already resized to the model input. Returns float32
    (N, L) sigmoid probabilities in vocab order.
    """

    def score_batch(self, images: np.ndarray) -> np.ndarray: ...


def ort_session(path: Path, threads: int | None = None) -> Any:
    """A CPU session with spinning off: measured 6-20% faster on 2 cores shared with decoding."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or available_cpus()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtScorer:
    """`Scorer` over an ONNX model: numpy normalisation, ONNX Runtime logits, sigmoid."""

    def __init__(
        self,
        path: Path,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        n_labels: int,
        threads: int | None = None,
        name: str = ORT_FP32,
    ) -> None:
        self.path = Path(path)
        self.session = ort_session(self.path, threads)
        self.mean, self.std = tuple(mean), tuple(std)
        self.n_labels = n_labels
        self.precision = name

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        x = normalise_batch(images, self.mean, self.std)
        (logits,) = self.session.run(["logits"], {"input": x})
        if logits.shape != (images.shape[0], self.n_labels):
            raise FastPathError(
                f"ONNX model {self.path} returned {logits.shape}, expected "
                f"({images.shape[0]}, {self.n_labels}): model and vocab do not match"
            )
        return sigmoid(logits)


def make_scorer(
    name: str,
    record: FastPathRecord | None,
    model: Any,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    n_labels: int,
    root: Path | None = None,
    threads: int | None = None,
) -> Scorer:
    """The scorer called `name` (one of the candidates), from the record's verified files."""
    if name == TORCH_FP32:
        return TorchScorer(model, mean=mean, std=std, n_labels=n_labels)
    if name == TORCH_BF16:
        return bf16_scorer(model, mean, std, n_labels)
    if record is None or name not in record.candidates or record.candidates[name].file is None:
        raise FastPathError(f"no verified {name} model in the fast-path cache")
    path = record_dir(record.model_sha256, root) / str(record.candidates[name].file)
    return file_scorer(name, path, mean=mean, std=std, n_labels=n_labels, threads=threads)


def file_scorer(
    name: str,
    path: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    n_labels: int,
    threads: int | None = None,
) -> Scorer:
    """The scorer for candidate `name` over its model file (one checked against its sha256,
    or one just written by `measure.measure_candidates`)."""
    if name == TORCH_BF16:
        return program_bf16_scorer(path, mean, std, n_labels)
    if name == AOTI_BF16:
        return AotiScorer(path, n_labels=n_labels)
    if name in (ORT_FP32, ORT_INT8):
        return OrtScorer(path, mean=mean, std=std, n_labels=n_labels, threads=threads, name=name)
    raise FastPathError(f"candidate {name!r} has no model file")
