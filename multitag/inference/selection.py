"""Which scorer a tagging run uses, for precision `auto` or `int8` on the CPU.

Reduced precision moves scores a little, so a fast path is only trusted after measuring, on
real images, that it makes the same label decisions as the fp32 torch model under the
model's own thresholds (`DEFAULT_AGREEMENT_BAR` of image-label decisions identical):

- At export (multitag.inference.measure.build_for_registry, called by
  multitag.training.retraining): every candidate is checked on the validation images and the
  record and files become part of the registry version. A run reads the record
  (`choose_for_run`, which skips what cannot run on this CPU) and checks nothing again.
- For versions registered without one (`select_scorer`): the first time a model file is used
  on a machine, a sample of the images to tag is checked (calibration and check sets
  disjoint) and the record cached (multitag.inference.records).

Precisions: `fp32` never comes here (torch eager, bit-stable scores); `auto` on CPU runs the
fastest candidate whose agreement meets the bar, else torch fp32 (the log and the manifest
say which and why); `int8` runs the int8 ONNX model whatever its agreement (logged if below
the bar).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multitag.inference import cpu, measure
from multitag.inference.agreement import choose
from multitag.inference.records import (
    AOTI_BF16,
    DEFAULT_AGREEMENT_BAR,
    ORT_INT8,
    TORCH_BF16,
    TORCH_FP32,
    FastPathError,
    FastPathRecord,
    load_record,
)
from multitag.inference.scorers import Scorer, make_scorer
from multitag.inference.torch_scorer import n_labels_of

log = logging.getLogger(__name__)

# Sample taken from the images to tag when no record exists: calibration, then check.
N_CALIBRATION = 64
N_CHECK = 256  # x the labels: >= 1,500 decisions for 6 labels, 5,000 for VOC's 20


def choose_for_run(record: FastPathRecord, precision: str, bar: float) -> tuple[str, str]:
    """The candidate a tagging run on this machine uses, from a recorded measurement.

    `auto`: the fastest candidate meeting `bar` (the speeds were measured where the record was
    built, which ranks them well enough on CPUs alike); torch-bf16 only where this CPU has
    native bf16. `int8`: the int8 ONNX model, whatever its agreement (logged when below).
    """
    if precision == "int8":
        cand = record.candidates.get(ORT_INT8)
        if cand is None:
            raise FastPathError("the fast-path record has no int8 model; use auto or fp32")
        reason = f"int8 requested: {cand.agreement:.4%} of decisions equal to fp32"
        if cand.agreement < bar:
            log.warning("%s, below the %.2f%% bar; precision=auto would use fp32", reason,
                        100 * bar)  # fmt: skip
        return ORT_INT8, reason
    cands = dict(record.candidates)
    name, reason = choose(cands, bar)
    skipped: list[str] = []
    while (why := unusable_here(record, name)) is not None:
        cands.pop(name)
        skipped.append(f"{name} skipped: {why}")
        name, reason = choose(cands, bar)
    return name, reason + (f" ({'; '.join(skipped)})" if skipped else "")


def unusable_here(record: FastPathRecord, name: str) -> str | None:
    """Why candidate `name` cannot run on this machine, or None when it can.

    torch-bf16 needs native bf16 (emulated is slower than fp32). A compiled candidate is
    native code for the CPU and torch it was built with: it needs every CPU flag it was
    compiled for (else SIGILL, not an exception) and the same torch (its ABI).
    """
    cand = record.candidates[name]
    if name in (TORCH_BF16, AOTI_BF16) and not cpu.bf16_supported():
        return "no native bf16 on this CPU"
    if cand.requires is None:
        return None
    flags = cpu.cpu_flags()
    if flags is None:
        return "this machine's CPU flags are unknown"
    missing = sorted(set(cand.requires) - flags)
    if missing:
        return f"compiled for CPU flags this CPU lacks ({', '.join(missing)})"
    built, here = record.versions.get("torch"), cpu.torch_version()
    if built != here:
        return f"compiled for torch {built}, this is torch {here}"
    return None


@dataclass
class Selection:
    """The scorer a tagger uses and why (goes to the log and the tagger)."""

    scorer: Scorer
    name: str
    reason: str
    record: FastPathRecord | None


def select_scorer(
    model: Any,
    *,
    precision: str,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int,
    thresholds: Any,
    model_sha256: str,
    sample: Callable[[int], np.ndarray | None],
    bar: float = DEFAULT_AGREEMENT_BAR,
    root: Path | None = None,
    threads: int | None = None,
    batch_size: int = measure.CHECK_BATCH,
) -> Selection:
    """Pick the CPU scorer for `precision` in ("auto", "int8"); see the module docstring.

    `sample(n)` returns up to n model-ready uint8 images from the images to tag, or None
    when there are too few to check a fast path; it is only called when no record exists.
    Candidates are timed at `batch_size` when the record is built; the record is then
    reused whatever batch size later runs use.
    """
    if precision not in ("auto", "int8"):
        raise FastPathError(f"select_scorer handles auto and int8, not {precision!r}")
    n_labels = n_labels_of(model, img_size)

    def fp32(msg: str) -> Selection:
        scorer = make_scorer(TORCH_FP32, None, model, mean=mean, std=std, n_labels=n_labels)
        return Selection(scorer, TORCH_FP32, msg, None)

    record = load_record(model_sha256, root)
    if record is None:
        images = sample(N_CALIBRATION + N_CHECK)
        if images is None or len(images) < N_CALIBRATION + N_CHECK // 2:
            got = 0 if images is None else len(images)
            msg = (
                f"too few decodable images ({got} < {N_CALIBRATION + N_CHECK // 2}) to "
                "calibrate and check a fast path"
            )
            if precision == "int8":
                raise FastPathError(f"precision=int8: {msg}; use auto or fp32")
            log.info("precision auto -> fp32: %s", msg)
            return fp32(msg)
        measure.build_record(
            model, mean=mean, std=std, img_size=img_size, thresholds=thresholds,
            model_sha256=model_sha256, calibration=images[:N_CALIBRATION],
            check=images[N_CALIBRATION:], bar=bar, root=root, threads=threads,
            batch_size=batch_size,
        )  # fmt: skip
        # Use what was published (a concurrent build may have won), re-verified.
        record = load_record(model_sha256, root)
        if record is None:
            msg = "the fast-path cache changed while it was being built"
            if precision == "int8":
                raise FastPathError(f"precision=int8: {msg}; retry")
            log.warning("precision auto -> fp32: %s", msg)
            return fp32(msg)
    name, reason = choose_for_run(record, precision, bar)  # the bar may differ from the record's
    log.info("precision %s -> %s (%s)", precision, name, reason)
    scorer = make_scorer(name, record, model, mean=mean, std=std, n_labels=n_labels, root=root,
                         threads=threads)  # fmt: skip
    return Selection(scorer, name, reason, record)
