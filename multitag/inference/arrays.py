"""Model input and output arithmetic in numpy, shared by the scorers that do not run torch.

Why a module of its own: ONNX Runtime and the compiled model must see exactly the inputs the
torch scorer sees, and give probabilities the same way; one definition keeps them equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def normalise_batch(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), as TorchScorer does: x/255, then (x-m)/s.

    Same float32 operations in the same order, so ONNX fp32 sees the inputs torch sees.
    """
    check_uint8_batch(images)
    x = images.transpose(0, 3, 1, 2).astype(np.float32)
    x /= np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def check_uint8_batch(images: np.ndarray) -> None:
    """Refuse anything but the model-ready batch every scorer takes: uint8 (N, H, W, 3)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3); got {images.dtype} {images.shape}")


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Float32 logistic without overflow warnings for large negative logits."""
    x = x.astype(np.float32, copy=False)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out
