"""Network builders and metric functions that an exported learner refers to by name.

Why a module of its own: `learn.export()` pickles references to these functions and the
classes they build; `load_learner` in another process (a tagging worker, a registry load)
must be able to import them. Anything defined in a script or a notebook would not be.
Only torch (and numpy/sklearn lazily) is needed here, never fastai.
"""

from __future__ import annotations

import numpy as np
from torch import nn

SHAPES_CNN_WIDTHS: tuple[int, ...] = (16, 32, 32, 64, 64, 128)
SHAPES_CNN_POOL_AFTER: tuple[int, ...] = (0, 2, 4)  # 2x max-pool after these blocks (0-based)


def conv_bn_relu(n_in: int, n_out: int) -> nn.Sequential:
    """3x3 conv (no bias: BN follows), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(n_in, n_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(n_out),
        nn.ReLU(inplace=True),
    )


def shapes_cnn(
    pretrained: bool = False,
    widths: tuple[int, ...] = SHAPES_CNN_WIDTHS,
    pool_after: tuple[int, ...] = SHAPES_CNN_POOL_AFTER,
) -> nn.Sequential:
    """A small VGG-style CNN: one full-resolution block, then 2x pools between pairs of blocks.

    Why not resnet18 on the shapes data: measured on 2,000 images at 64 px, resnet18 and
    mobilenetv3_small (stems that downsample 4x at once) never left the "predict no label"
    baseline from random init. Why three pools and narrow widths: measured on 2 CPU cores,
    (16, 32, 32, 64, 64, 128) with pools after blocks 0, 2, 4 learns as fast per epoch as
    (32, 32, 64, 64, 128, 128) with two pools, at a third of the time per epoch; its
    receptive field (~50 px) covers the largest shape. Ends in an adaptive pool so fastai's
    `create_body` cuts before it and adds its own head. There are no pretrained weights.
    """
    if pretrained:
        raise ValueError("shapes_cnn has no pretrained weights; train it with pretrained=False.")
    layers: list[nn.Module] = []
    n_in = 3
    for i, width in enumerate(widths):
        layers.append(conv_bn_relu(n_in, width))
        if i in pool_after:
            layers.append(nn.MaxPool2d(2))
        n_in = width
    layers.append(nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers)


def mean_average_precision(targets: np.ndarray, probs: np.ndarray) -> float:
    """Mean over labels of average precision, skipping labels with no positive.

    Why not sklearn's macro average directly: a label absent from a (small) validation split
    scores AP = 0 there and drags the mean down for a reason that says nothing about the
    model. NaN when no label has a positive at all, so nobody mistakes it for a score.
    """
    # Lazy: sklearn takes 2.8-3.5 s to import (measured, torch already loaded), and every
    # process that unpickles a model imports this module without ever calling this function.
    from sklearn.metrics import average_precision_score

    targets = np.asarray(targets).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    if targets.ndim == 1:
        targets, probs = targets[:, None], probs[:, None]
    aps = [
        average_precision_score(targets[:, j], probs[:, j])
        for j in range(targets.shape[1])
        if targets[:, j].any()
    ]
    return float(np.mean(aps)) if aps else float("nan")
