"""How a model wants its input (`InferenceSpec`) and what it saw in training (`ModelBaseline`).

Why a module of its own: both are read from a registry version's files (inference.json,
metrics.json) before any scorer exists, and the Tagger, the loader and the fast-path check
all decode images by the same spec (`spec_decoder`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from multitag.inference.faults import TaggingError
from multitag.inference.imaging import DEFAULT_MAX_PIXELS, WHITE, DecodedImage, decode_image


@dataclass(frozen=True)
class InferenceSpec:
    """How the model wants its input: inference.json, as multitag.training.learner writes it."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    vocab: tuple[str, ...]
    resize_method: str = "crop"
    pad_mode: str = "reflection"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InferenceSpec:
        missing = [
            k for k in ("img_size", "mean", "std", "vocab", "resize_method") if k not in data
        ]
        if missing:
            raise TaggingError(
                f"inference spec lacks {missing}: the model's inference.json must say how its "
                "inputs were prepared (multitag.training.learner.inference_spec writes it)"
            )
        size = data["img_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise TaggingError(f"inference img_size must be a positive int (square); got {size!r}")
        mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise TaggingError(f"inference mean/std must be 3 values (std > 0); got {mean}, {std}")
        method = str(data["resize_method"])
        if method not in ("crop", "squish", "pad"):
            raise TaggingError(f"unknown resize_method {method!r}; expected crop, squish or pad")
        vocab = tuple(str(v) for v in data["vocab"])
        if not vocab:
            raise TaggingError("inference vocab is empty: the model has no labels")
        return cls(size, mean, std, vocab, method, str(data.get("pad_mode", "reflection")))

    @classmethod
    def from_learner(cls, learn: Any) -> InferenceSpec:
        """Read the validation transforms of any fastai learner (Resize + Normalize)."""
        from fastai.data.transforms import Normalize
        from fastai.vision.augment import Resize

        resizes = [t for t in learn.dls.after_item.fs if isinstance(t, Resize)]
        norms = [t for t in learn.dls.after_batch.fs if isinstance(t, Normalize)]
        if len(resizes) != 1 or len(norms) != 1:
            raise TaggingError(
                f"learner has {len(resizes)} Resize item and {len(norms)} Normalize batch "
                "transforms; exactly one of each is needed to reproduce its input"
            )
        w, h = resizes[0].size
        if w != h:
            raise TaggingError(f"non-square model input {w}x{h} is not supported")
        norm = norms[0]
        return cls.from_dict(
            {
                "img_size": int(w),
                "mean": [float(v) for v in norm.mean.flatten().cpu()],
                "std": [float(v) for v in norm.std.flatten().cpu()],
                "vocab": [str(v) for v in learn.dls.vocab],
                "resize_method": str(resizes[0].method),
                "pad_mode": str(resizes[0].pad_mode),
            }
        )


@dataclass(frozen=True)
class ModelBaseline:
    """What the model saw in training, to compare a run's label rates against."""

    vocab: tuple[str, ...]
    train_label_prevalence: dict[str, float] | None = None
    train_none_rate: float | None = None

    @classmethod
    def from_metrics(cls, vocab: Sequence[str], metrics: Mapping[str, Any] | None) -> ModelBaseline:
        metrics = metrics or {}
        prev = metrics.get("train_label_prevalence")
        none = metrics.get("train_none_rate")
        return cls(
            vocab=tuple(vocab),
            train_label_prevalence={str(k): float(v) for k, v in prev.items()} if prev else None,
            train_none_rate=float(none) if none is not None else None,
        )


def spec_decoder(
    spec: InferenceSpec,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = WHITE,
    draft: bool = True,
) -> Callable[[bytes], DecodedImage]:
    """`decode_image` with the spec's size, resize method and padding: bytes -> model input."""
    return functools.partial(
        decode_image,
        target_size=spec.img_size,
        resize_method=spec.resize_method,  # type: ignore[arg-type]
        pad_mode=spec.pad_mode,  # type: ignore[arg-type]
        max_pixels=max_pixels,
        background=background,
        draft=draft,
    )
