"""The agreement rule: a fast path is trusted only where it makes fp32's label decisions.

Why a module of its own: the same two functions judge a candidate when it is measured
(multitag.inference.measure) and when a run picks one (multitag.inference.selection); the
benchmarks judge with them too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from multitag.inference.records import TORCH_FP32, CandidateResult
from multitag.training.thresholds import apply_thresholds


def decision_agreement(reference: np.ndarray, candidate: np.ndarray, thresholds: Any) -> float:
    """Share of image-label decisions (score > threshold) that are identical.

    `thresholds`: a ThresholdSet, an (L,) array or a float, as `apply_thresholds` takes.
    """
    if reference.shape != candidate.shape or reference.ndim != 2 or reference.size == 0:
        raise ValueError(
            f"need two equal non-empty (N, L) arrays; got {reference.shape} and {candidate.shape}"
        )
    a = apply_thresholds(reference.astype(np.float32), thresholds)
    b = apply_thresholds(candidate.astype(np.float32), thresholds)
    return float(np.mean(a == b))


def choose(candidates: dict[str, CandidateResult], bar: float) -> tuple[str, str]:
    """The fastest candidate whose agreement meets `bar`, else torch fp32; and why."""
    ok = [c for c in candidates.values() if c.name == TORCH_FP32 or c.agreement >= bar]
    best = max(ok, key=lambda c: c.images_per_s) if ok else None
    below = sorted(
        f"{c.name} {c.agreement:.4%}"
        for c in candidates.values()
        if c.name != TORCH_FP32 and c.agreement < bar
    )
    note = f"; below the bar: {', '.join(below)}" if below else ""
    if best is None or best.name == TORCH_FP32:
        return TORCH_FP32, f"no faster path agrees with fp32 on >= {bar:.2%} of decisions{note}"
    return best.name, (
        f"{best.name}: {best.agreement:.4%} of decisions equal to fp32 (bar {bar:.2%}), "
        f"{best.images_per_s:.1f} img/s{note}"
    )
