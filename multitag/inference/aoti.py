"""The compiled bf16 candidate: an AOTInductor package built at export, and its scorer.

Why a module of its own: compiling (~15-80 s, a C++ compiler, torch's inductor) happens once
at export; running the package at tagging time should need neither inductor nor, where the
installed torch is the verified one, torch's Python package (multitag._compat.torch).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from multitag._compat import torch as torch_compat
from multitag.inference.arrays import check_uint8_batch, sigmoid
from multitag.inference.cpu import compiled_isa_flags
from multitag.inference.records import AOTI_BF16, FastPathError

log = logging.getLogger(__name__)


def _uint8_bf16_module(model: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """uint8 (N, H, W, 3) in, fp32 logits out: fastai's normalisation, a bf16 body, fp32 head.

    The preprocessing is inside so the compiler fuses it (no separate numpy/torch pass per
    batch). The head (fastai's `model[1]`) stays fp32 for the reason
    `onnx_export.head_nodes` gives; a model that is not `Sequential(body, head)` runs wholly
    in bf16.
    """
    import torch
    from torch import nn

    class Uint8Bf16(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            split = isinstance(model, nn.Sequential) and len(model) == 2
            body, head = (model[0], model[1]) if split else (model, None)
            self.body = copy.deepcopy(body).eval().cpu().to(torch.bfloat16)
            self.head = copy.deepcopy(head).eval().cpu().float() if head is not None else None
            self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # NHWC -> NCHW view with channels_last strides: what oneDNN's bf16 convs want
            x = x.permute(0, 3, 1, 2).float().div(255.0)
            x = ((x - self.mean) / self.std).to(torch.bfloat16)
            feats = self.body(x).float()
            return self.head(feats) if self.head is not None else feats

    return Uint8Bf16().eval()


def compile_bf16(
    model: Any, path: Path, img_size: int, mean: Sequence[float], std: Sequence[float]
) -> list[str]:
    """AOTInductor package of the bf16 model at `path`; returns the CPU flags it needs.

    Why: compiled ahead of time (weights frozen and prepacked, preprocessing and elementwise
    ops fused) it ran resnet18 at 388 img/s here, against 181 for eager bf16 autocast and 212
    for int8 ONNX Runtime (benchmarks/RESULTS.md, session 3); compiling takes ~15-80 s, paid
    once at export, and loading the package ~0.02 s. The code is built for this CPU's vector
    ISA, so the flags are recorded and `selection.unusable_here` refuses the package on a CPU
    without them. Needs a C++ compiler; raises whatever inductor raises when there is none.
    """
    import torch

    # Its import warns "No CUDA runtime is found" on a CPU-only machine: noise in every
    # retrain's log for a compile that never uses CUDA.
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension
    finally:
        cpp_log.setLevel(level)
    module = _uint8_bf16_module(model, mean, std)
    batch = torch.export.Dim("batch", min=1, max=65536)
    example = torch.zeros(2, img_size, img_size, 3, dtype=torch.uint8)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        torch_compat.aoti_compile_and_package(program, str(path), freezing=True)
    return compiled_isa_flags()


class PackageRunner:
    """A package run by torch's own loader (`aoti_load_package`, via multitag._compat.torch).

    Imports torch and inductor, and holds the GIL for the forward pass; used where the ctypes
    driver is not verified for the installed torch (multitag._compat.torch).
    """

    def __init__(self, path: Path) -> None:
        self._model = torch_compat.aoti_load_package(str(path))

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self._model(torch.from_numpy(x))
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.float().numpy()


class AotiScorer:
    """`Scorer` over an AOTInductor package from `compile_bf16` (a sha256-checked file).

    Driven through its C interface with ctypes (`torch_compat.CRunner`: the GIL is released,
    so decoding and the forward pass overlap, and torch's Python package is never imported)
    where the canary says the installed torch declares that interface as verified; else by
    torch's public loader (`PackageRunner`). See multitag._compat.torch for the figures.
    """

    def __init__(self, path: Path, *, n_labels: int, name: str = AOTI_BF16) -> None:
        self.path = Path(path)
        try:
            self._runner: Any = torch_compat.CRunner(self.path)
        except (OSError, AttributeError, KeyError, RuntimeError) as exc:
            log.info("compiled model %s via the package loader (%s)", self.path.name, exc)
            self._runner = PackageRunner(self.path)
        self.n_labels = n_labels
        self.precision = name

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        check_uint8_batch(images)
        try:
            logits = self._runner.run(np.ascontiguousarray(images))
        except torch_compat.CompatError as exc:
            raise FastPathError(str(exc)) from exc
        probs = sigmoid(logits)
        if probs.shape != (images.shape[0], self.n_labels):
            raise FastPathError(
                f"model returned scores of shape {probs.shape}, expected "
                f"({images.shape[0]}, {self.n_labels}): model and vocab do not match"
            )
        return probs
