"""The torch scorers: eager fp32 (the reference every fast path is checked against) and bf16.

Why a module of its own: every other scorer is measured against `TorchScorer` in fp32, and
the bf16 variants (autocast on a channels_last copy, or a saved `torch.export` program) are
the same class with another precision; none of them needs the Tagger.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from multitag.inference.arrays import check_uint8_batch
from multitag.inference.faults import TaggingError


class TorchScorer:
    """Batched torch inference: eval mode, inference_mode, the model's own normalisation."""

    def __init__(
        self,
        model: Any,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        n_labels: int,
        device: str = "cpu",
        precision: str = "fp32",
        captured: bool = False,
    ) -> None:
        """`captured`: a `torch.export` program's module, fixed in eval mode when it was
        exported (it refuses `.eval()`)."""
        import torch

        if precision not in ("fp32", "bf16"):
            raise TaggingError(
                f"precision {precision!r} is not available for the torch scorer; use fp32 or "
                "bf16 (int8 needs a quantised ONNX model)"
            )
        self.device = torch.device(device)
        self.model = (model if captured else model.eval()).to(self.device)
        self.precision = precision
        self.n_labels = n_labels
        self._mean = torch.tensor(list(mean), dtype=torch.float32, device=self.device)
        self._std = torch.tensor(list(std), dtype=torch.float32, device=self.device)
        self._mean, self._std = self._mean.view(1, 3, 1, 1), self._std.view(1, 3, 1, 1)

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        import torch

        check_uint8_batch(images)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            # fastai order: IntToFloatTensor (/255) then Normalize((x - mean) / std).
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = (x - self._mean) / self._std
            if self.precision == "bf16":
                # [fastpath] channels_last input: oneDNN's bf16 convolutions run NHWC.
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                    logits = self.model(x)
            else:
                logits = self.model(x)
            probs = torch.sigmoid(logits.float()).cpu().numpy()
        if probs.shape != (images.shape[0], self.n_labels):
            raise TaggingError(
                f"model returned scores of shape {probs.shape}, expected "
                f"({images.shape[0]}, {self.n_labels}): model and vocab do not match"
            )
        return probs.astype(np.float32, copy=False)


def torch_precision(precision: str) -> str:
    """The torch scorer's precision for a run's `precision`: "auto" and "int8" start from the
    fp32 model; multitag.inference.loading then picks the fast path measured to keep the
    thresholds' decisions before the Tagger is built."""
    return "fp32" if precision in ("auto", "int8") else precision


def n_labels_of(model: Any, img_size: int) -> int:
    """The model's output width, from one forward pass on a zero image."""
    import torch

    with torch.inference_mode():
        out = model.eval()(torch.zeros(1, 3, img_size, img_size))
    return int(out.shape[-1])


def bf16_scorer(
    model: Any,
    mean: Sequence[float],
    std: Sequence[float],
    n_labels: int,
    *,
    captured: bool = False,
) -> TorchScorer:
    """Torch bf16 autocast on a channels_last copy (the fp32 model stays as it was).

    A `captured` program's module was loaded for this scorer alone: converted in place, since
    a copy would hold the weights twice (~100 MB for resnet50).
    """
    import torch

    fast = (model if captured else copy.deepcopy(model)).to(memory_format=torch.channels_last)
    return TorchScorer(
        fast, mean=mean, std=std, n_labels=n_labels, precision="bf16", captured=captured
    )


def export_program(model: Any, path: Path, img_size: int) -> Path:
    """`torch.export` of the fp32 model in eval mode, any batch size, saved to `path`.

    Why: a bf16 run then needs torch only, not fastai and not the learner's pickle (~3-4 s
    and ~1 GB per process here); the saved program holds the graph and weights, no code.
    """
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.export.export(
            model.eval(),
            (torch.zeros(2, 3, img_size, img_size),),
            dynamic_shapes=({0: batch},),
        )
    torch.export.save(program, str(path))
    return path


def program_bf16_scorer(
    path: Path, mean: Sequence[float], std: Sequence[float], n_labels: int
) -> TorchScorer:
    """The bf16 scorer over a saved program (only ever a sha256-checked registry file)."""
    import torch

    module = torch.export.load(str(path)).module()
    return bf16_scorer(module, mean, std, n_labels, captured=True)
