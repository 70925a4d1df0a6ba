"""Reduced-precision scorers for CPU tagging, used only where they keep fp32's decisions.

Why this module: on a small CPU the model's forward pass is most of a tagging run, and eager
fp32 torch is the slowest way to run it. ONNX Runtime (fp32, or int8 after static
quantisation) and torch bf16 autocast + channels_last (oneDNN, AVX512-BF16/AMX) run the same
network several times faster. Reduced precision moves scores a little, so a fast path is
only trusted after measuring, on real images, that it makes the same label decisions as the
fp32 torch model under the model's own thresholds (`DEFAULT_AGREEMENT_BAR` of image-label
decisions identical).

Where the check happens:

- At export (`build_for_registry`, called by `multitag.training.retraining.register_stage`): the
  final model is exported to ONNX fp32 and int8 (calibrated on training images) and every
  candidate is scored against torch fp32 on the validation images (up to
  `RetrainParams.fastpath_check_images`, 1,000 by default: thousands of decisions, enough to
  hold a 0.5% bar). The ONNX files and `fastpath.json` (agreement, flips, max score
  difference, img/s, sha256 of each file), plus a `torch.export` program of the fp32 model
  for the bf16 candidate (`model.pt2`) and the bf16 model compiled ahead of time with
  AOTInductor (`aoti-bf16`, `model.bf16.aoti.pt2`, with the CPU flags it needs), become files
  of the registry version, covered by its SHA256SUMS. Tagging reads the record
  (`choose_for_run`, which skips what cannot run on this CPU) and checks nothing again; the
  pick is loaded from the version's own file, so the learner is not unpickled and fastai is
  not imported (an ONNX pick does not import torch either).
- For versions registered without one (`select_scorer`): the first time a model file is
  used on a machine, a sample of the images to tag is checked (calibration and check sets
  disjoint) and the record cached under MULTITAG_CACHE_DIR, keyed by the model file's
  sha256 + onnxruntime + torch versions; a cached ONNX file whose sha256 no longer matches
  the record is never loaded: the record is rebuilt.

Precisions: `fp32` never comes here (torch eager, bit-stable scores); `auto` on CPU runs the
fastest candidate whose agreement meets the bar, else torch fp32 (the log and the manifest
say which and why); `int8` runs the int8 ONNX model whatever its agreement (logged if below
the bar).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FASTPATH_FORMAT = "multitag-fastpath/1"
RECORD_FILE = "fastpath.json"
FP32_ONNX = "model.fp32.onnx"
INT8_ONNX = "model.int8.onnx"
TORCH_PROGRAM = "model.pt2"  # torch.export of the fp32 model, run under bf16 autocast
AOTI_PACKAGE = "model.bf16.aoti.pt2"  # AOTInductor-compiled bf16 program (native code)
DEFAULT_AGREEMENT_BAR = 0.995
ONNX_OPSET = 17
# Sample taken from the images to tag when no record exists: calibration, then check.
N_CALIBRATION = 64
N_CHECK = 256  # x the labels: >= 1,500 decisions for 6 labels, 5,000 for VOC's 20
CHECK_BATCH = 64  # the tagger's default batch size
# Candidate names, as recorded and as accepted by `make_scorer`.
ORT_INT8 = "onnx-int8"
TORCH_BF16 = "torch-bf16"
AOTI_BF16 = "aoti-bf16"
ORT_FP32 = "onnx-fp32"
TORCH_FP32 = "torch-fp32"


class FastPathError(Exception):
    """A fast path cannot be built or used; the message says what to do instead."""


# ==================================================================== input preparation


def normalise_batch(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), as TorchScorer does: x/255, then (x-m)/s.

    Same float32 operations in the same order, so ONNX fp32 sees the inputs torch sees.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
    x = images.transpose(0, 3, 1, 2).astype(np.float32)
    x /= np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Float32 logistic without overflow warnings for large negative logits."""
    x = x.astype(np.float32, copy=False)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


# ============================================================================ ONNX files


def export_onnx(model: Any, path: Path, img_size: int, *, opset: int = ONNX_OPSET) -> Path:
    """Export a torch model (normalised float NCHW in, logits out) with a dynamic batch axis.

    The TorchScript exporter (`dynamo=False`): it folds BatchNorm into the convolutions in
    eval mode and needs no tracing of fastai's Python, in ~1 s for resnet50.
    """
    import warnings

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


def ort_session(path: Path, threads: int | None = None) -> Any:
    """A CPU session with spinning off: measured 6-20% faster on 2 cores shared with decoding."""
    import onnxruntime as ort

    from multitag.runtime import available_cpus

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


# ============================================================================ agreement


def decision_agreement(reference: np.ndarray, candidate: np.ndarray, thresholds: Any) -> float:
    """Share of image-label decisions (score > threshold) that are identical.

    `thresholds`: a ThresholdSet, an (L,) array or a float, as `apply_thresholds` takes.
    """
    from multitag.training.thresholds import apply_thresholds

    if reference.shape != candidate.shape or reference.ndim != 2 or reference.size == 0:
        raise ValueError(
            f"need two equal non-empty (N, L) arrays; got {reference.shape} and {candidate.shape}"
        )
    a = apply_thresholds(reference.astype(np.float32), thresholds)
    b = apply_thresholds(candidate.astype(np.float32), thresholds)
    return float(np.mean(a == b))


@dataclass
class CandidateResult:
    name: str
    agreement: float  # share of image-label decisions equal to torch fp32 on the check set
    images_per_s: float  # on the check set, same process, after a warm-up batch
    max_abs_diff: float  # largest |score - fp32 score|
    n_flips: int
    file: str | None = None  # the candidate's model file in the record's folder
    sha256: str | None = None
    requires: list[str] | None = None  # CPU flags its native code needs (compiled candidates)


@dataclass
class FastPathRecord:
    """What was measured for one model file; `fastpath.json` in its cache folder."""

    model_sha256: str
    versions: dict[str, str]
    created_at: str
    bar: float
    n_calibration: int
    n_check: int
    n_labels: int
    candidates: dict[str, CandidateResult]
    chosen: str
    reason: str
    build_s: float
    format: str = FASTPATH_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FastPathRecord:
        if data.get("format") != FASTPATH_FORMAT:
            raise FastPathError(
                f"fast-path record format {data.get('format')!r} is not {FASTPATH_FORMAT}"
            )
        cands = {k: CandidateResult(**v) for k, v in data["candidates"].items()}
        return cls(**{**data, "candidates": cands})


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


# ================================================================================ cache


def library_versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def record_dir(model_sha256: str, root: Path | None = None) -> Path:
    """Cache folder of one model file under one onnxruntime/torch pair."""
    from multitag.registry import cache_dir

    v = library_versions()
    key = f"{model_sha256[:32]}-ort{v['onnxruntime']}-torch{v['torch']}"
    return (root or cache_dir() / "fastpath") / key.replace("+", "_")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_record(model_sha256: str, root: Path | None = None) -> FastPathRecord | None:
    """The cached record, or None when absent or when any file fails its sha256 check."""
    folder = record_dir(model_sha256, root)
    path = folder / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = FastPathRecord.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, FastPathError) as exc:
        log.warning("fast-path record %s is unreadable (%s): rebuilding it", path, exc)
        return None
    if record.model_sha256 != model_sha256:
        log.warning("fast-path record %s belongs to another model: rebuilding it", path)
        return None
    for cand in record.candidates.values():
        if cand.file is None:
            continue
        f = folder / cand.file
        if not f.is_file() or sha256_file(f) != cand.sha256:
            log.warning(
                "cached %s does not match its recorded sha256: rebuilding the fast "
                "path (never loading a changed model file)",
                f,
            )
            return None
    return record


def _atomic_publish(tmp: Path, folder: Path) -> None:
    """Replace `folder` by the fully written `tmp` (a concurrent builder may win: fine)."""
    old = folder.with_name(folder.name + f".old-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        folder.rename(old)
    try:
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process published first
    shutil.rmtree(old, ignore_errors=True)


# ================================================================================ build


def _timed_scores(
    scorer: Any, images: np.ndarray, batch: int = CHECK_BATCH
) -> tuple[np.ndarray, float]:
    """Scores of all images in `batch`-sized batches, and images/s on full batches.

    Timed at the batch size the tagger will use: measured here, bf16 on resnet50 ran 54 img/s
    at batch 32 and 26 at batch 64, so a ranking at another size can pick the slower path.
    The speed comes from at least two full batches after a warm-up one (check images tiled
    when there are fewer), so a small check set still ranks the candidates at that size.
    """
    out = np.concatenate(
        [scorer.score_batch(images[i : i + batch]) for i in range(0, len(images), batch)]
    )
    full = images[np.arange(2 * batch) % len(images)]
    scorer.score_batch(full[:batch])  # warm-up: allocation, kernel choice
    t0 = time.perf_counter()
    for i in range(0, len(full), batch):
        scorer.score_batch(full[i : i + batch])
    dt = time.perf_counter() - t0
    return out, len(full) / dt if dt > 0 else float("inf")


_NATIVE_BF16 = {"avx512_bf16", "amx_bf16"}


def bf16_supported() -> bool:
    """Whether this CPU has native bf16 (AVX512-BF16 or AMX); emulated bf16 is slower.

    Read from the CPU's flags, so that tagging with a compiled model never imports torch just
    to ask (~1.7 s); torch is asked only where the flags are unknown (not Linux). (torch's own
    `_is_mkldnn_bf16_supported` also says yes for AVX-512 without bf16, where oneDNN emulates.)
    """
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & _NATIVE_BF16)
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def torch_version() -> str | None:
    """The installed torch's `__version__` (with its local part, e.g. +cu130), or None.

    From torch/version.py without importing torch (~1.7 s) unless it is already imported.
    """
    import re
    import sys

    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)
    package = _torch_dir()
    if package is None:
        return None
    try:
        text = (package / "version.py").read_text()
    except OSError:
        text = ""
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    if found:
        return found.group(1)
    import torch

    return str(torch.__version__)


def measure_candidates(
    model: Any,
    folder: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int,
    thresholds: Any,
    calibration: np.ndarray,
    check: np.ndarray,
    threads: int | None = None,
    batch_size: int = CHECK_BATCH,
    torch_program: bool = False,
) -> tuple[dict[str, CandidateResult], int]:
    """Export and quantise into `folder`, then score every candidate against torch fp32.

    `calibration` and `check`: uint8 (N, H, W, 3) model-ready images, disjoint. Returns the
    results by candidate name and the model's label count. `torch_program`: also save the
    bf16 candidate as a `torch.export` program (for the registry: no unpickling to run it).
    """
    from multitag.inference.tagger import TorchScorer

    if len(check) == 0 or len(calibration) == 0:
        raise FastPathError("a fast path needs calibration and check images; got none")
    n_labels = _n_labels(model, img_size)
    ref = TorchScorer(model, mean=mean, std=std, n_labels=n_labels)
    ref_probs, ref_speed = _timed_scores(ref, check, batch_size)
    results = {TORCH_FP32: CandidateResult(TORCH_FP32, 1.0, ref_speed, 0.0, 0)}
    export_onnx(model, folder / FP32_ONNX, img_size)
    quantize_int8(folder / FP32_ONNX, folder / INT8_ONNX, normalise_batch(calibration, mean, std))
    files = {ORT_FP32: FP32_ONNX, ORT_INT8: INT8_ONNX}
    requires: dict[str, list[str]] = {}
    scorers: dict[str, Callable[[], Any]] = {}
    if bf16_supported():
        scorers[TORCH_BF16] = lambda: bf16_scorer(model, mean, std, n_labels)
        if torch_program:
            try:  # then checked as it will run: the saved program, loaded back
                export_program(model, folder / TORCH_PROGRAM, img_size)
                files[TORCH_BF16] = TORCH_PROGRAM
            except Exception as exc:  # an architecture torch.export cannot capture
                log.warning("no torch program for bf16 (%s): a bf16 run will unpickle", exc)
            try:
                requires[AOTI_BF16] = compile_bf16(model, folder / AOTI_PACKAGE, img_size,
                                                   mean, std)  # fmt: skip
                files[AOTI_BF16] = AOTI_PACKAGE
            except Exception as exc:  # no C++ compiler, an op inductor cannot lower, ...
                log.warning("no compiled bf16 candidate (%s: %s)", type(exc).__name__, exc)
    for name, file in files.items():
        scorers[name] = lambda n=name, f=file: file_scorer(
            n, folder / f, mean=mean, std=std, n_labels=n_labels, threads=threads
        )
    for name, make in scorers.items():
        probs, speed = _timed_scores(make(), check, batch_size)
        agree = decision_agreement(ref_probs, probs, thresholds)
        n = round((1.0 - agree) * ref_probs.size)
        f = files.get(name)
        results[name] = CandidateResult(
            name, agree, speed, float(np.max(np.abs(probs - ref_probs))), n, f,
            sha256_file(folder / f) if f else None, requires.get(name),
        )  # fmt: skip
    return results, n_labels


def _record(
    results: dict[str, CandidateResult],
    *,
    model_sha256: str,
    n_labels: int,
    bar: float,
    n_calibration: int,
    n_check: int,
    t_start: float,
    extra: dict[str, Any],
) -> FastPathRecord:
    chosen, reason = choose(results, bar)
    return FastPathRecord(
        model_sha256=model_sha256,
        versions=library_versions(),
        created_at=datetime.now(UTC).isoformat(),
        bar=bar,
        n_calibration=n_calibration,
        n_check=n_check,
        n_labels=n_labels,
        candidates=results,
        chosen=chosen,
        reason=reason,
        build_s=round(time.perf_counter() - t_start, 2),
        extra=extra,
    )


def build_record(
    model: Any,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int,
    thresholds: Any,
    model_sha256: str,
    calibration: np.ndarray,
    check: np.ndarray,
    bar: float = DEFAULT_AGREEMENT_BAR,
    root: Path | None = None,
    threads: int | None = None,
    batch_size: int = CHECK_BATCH,
) -> FastPathRecord:
    """Export, quantise, measure every candidate against torch fp32, write the cache record.

    For models registered without an export-time record (see `build_for_registry`):
    `calibration` and `check` come from the images the model is about to tag.
    """
    if len(check) == 0 or len(calibration) == 0:
        raise FastPathError("a fast path needs calibration and check images; got none")
    folder = record_dir(model_sha256, root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        record = build_for_registry(
            model, tmp, mean=mean, std=std, img_size=img_size, thresholds=thresholds,
            model_sha256=model_sha256, calibration=calibration, check=check, bar=bar,
            batch_size=batch_size, threads=threads, sets=("images to tag", "images to tag"),
            torch_program=False,
        )  # fmt: skip
        _atomic_publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def build_for_registry(
    model: Any,
    out_dir: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int,
    thresholds: Any,
    model_sha256: str,
    calibration: np.ndarray,
    check: np.ndarray,
    bar: float = DEFAULT_AGREEMENT_BAR,
    batch_size: int = CHECK_BATCH,
    threads: int | None = None,
    sets: tuple[str, str] = ("validation", "training"),
    torch_program: bool = True,
) -> FastPathRecord:
    """The export-time fast path: ONNX files and fastpath.json in `out_dir`, for the registry.

    Why at export: the validation set is labelled, large and already there, so the agreement
    behind `precision=auto` is measured once on many images (a 0.5% bar needs thousands of
    decisions) instead of on a small sample in every tagging run; the record, the ONNX files
    and their sha256 then travel with the model version, and a tagging run that uses an ONNX
    candidate never unpickles the learner. `calibration`: training images; `check`:
    validation images (uint8, model-ready, disjoint); `sets` names them in the record.
    `build_record` reuses it for the tag-time check (no torch program: that path has the
    learner).
    """
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    results, n_labels = measure_candidates(
        model, out_dir, mean=mean, std=std, img_size=img_size, thresholds=thresholds,
        calibration=calibration, check=check, threads=threads, batch_size=batch_size,
        torch_program=torch_program,
    )  # fmt: skip
    record = _record(
        results, model_sha256=model_sha256, n_labels=n_labels, bar=bar,
        n_calibration=len(calibration), n_check=len(check), t_start=t_start,
        extra={"batch_size": batch_size, "check_set": sets[0], "calibration_set": sets[1]},
    )  # fmt: skip
    (out_dir / RECORD_FILE).write_text(json.dumps(record.to_json(), indent=2))
    log.info("fast path for model %s (checked on %s images): %s", model_sha256[:12], sets[0],
             record.reason)  # fmt: skip
    return record


def registry_files(out_dir: Path) -> dict[str, Path]:
    """The files of `build_for_registry` by name, as `registry.register_model(extra_files=)`."""
    names = (RECORD_FILE, FP32_ONNX, INT8_ONNX, TORCH_PROGRAM, AOTI_PACKAGE)
    return {name: out_dir / name for name in names if (out_dir / name).is_file()}


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
    if name in (TORCH_BF16, AOTI_BF16) and not bf16_supported():
        return "no native bf16 on this CPU"
    if cand.requires is None:
        return None
    flags = cpu_flags()
    if flags is None:
        return "this machine's CPU flags are unknown"
    missing = sorted(set(cand.requires) - flags)
    if missing:
        return f"compiled for CPU flags this CPU lacks ({', '.join(missing)})"
    built, here = record.versions.get("torch"), torch_version()
    if built != here:
        return f"compiled for torch {built}, this is torch {here}"
    return None


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux names them (/proc/cpuinfo), or None elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _n_labels(model: Any, img_size: int) -> int:
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
) -> Any:
    """Torch bf16 autocast on a channels_last copy (the fp32 model stays as it was).

    A `captured` program's module was loaded for this scorer alone: converted in place, since
    a copy would hold the weights twice (~100 MB for resnet50).
    """
    import torch

    from multitag.inference.tagger import TorchScorer

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
) -> Any:
    """The bf16 scorer over a saved program (only ever a sha256-checked registry file)."""
    import torch

    module = torch.export.load(str(path)).module()
    return bf16_scorer(module, mean, std, n_labels, captured=True)


def _uint8_bf16_module(model: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """uint8 (N, H, W, 3) in, fp32 logits out: fastai's normalisation, a bf16 body, fp32 head.

    The preprocessing is inside so the compiler fuses it (no separate numpy/torch pass per
    batch). The head (fastai's `model[1]`) stays fp32 for the reason `head_nodes` gives; a
    model that is not `Sequential(body, head)` runs wholly in bf16.
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
    ISA, so the flags are recorded and `unusable_here` refuses the package on a CPU without
    them. Needs a C++ compiler; raises whatever inductor raises when there is none.
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
    import torch._inductor
    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa

    module = _uint8_bf16_module(model, mean, std)
    batch = torch.export.Dim("batch", min=1, max=65536)
    example = torch.zeros(2, img_size, img_size, 3, dtype=torch.uint8)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return isa_flags(cpu_vec_isa.pick_vec_isa().build_arch_flags())


# gcc -m options whose /proc/cpuinfo name is not the option with "-" -> "_"
_FLAG_NAMES = {
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
}


def isa_flags(build_flags: str) -> list[str]:
    """gcc's `-mavx512f -mamx-tile ...` as /proc/cpuinfo flags: avx512f, amx_tile ..."""
    names = {o[2:].replace("-", "_") for o in build_flags.split() if o.startswith("-m")}
    return sorted(_FLAG_NAMES.get(n, n) for n in names)


class AotiScorer:
    """`Scorer` over an AOTInductor package from `compile_bf16` (a sha256-checked file).

    Why not `torch._inductor.aoti_load_package`: it imports inductor (1.2 s, ~250 MB here) for
    nothing at run time, and its runner holds the GIL for the whole forward pass, so the
    tagger's decode threads stop while the model runs (measured: phone photos tagged 11%
    slower than with ONNX int8, whose runs release the GIL). The package's model library
    exports AOTInductor's C interface (`aoti_runtime/interface.h`) and needs only libtorch's
    C shim (`aoti_torch_*`); called through ctypes, which releases the GIL, decoding and the
    forward pass overlap, and torch's Python package is never imported (`_CRunner`: 0.3-0.6 s
    to load libtorch instead of ~1.7 s for `import torch`, ~260 MB less). `_GilHoldingRunner`
    (the package loader) remains for a package whose library cannot be driven that way.
    """

    def __init__(self, path: Path, *, n_labels: int, name: str = AOTI_BF16) -> None:
        self.path = Path(path)
        try:
            self._runner: Any = _CRunner(self.path)
        except (OSError, AttributeError, KeyError, RuntimeError) as exc:
            log.info("compiled model %s via the package loader (%s)", self.path.name, exc)
            self._runner = _GilHoldingRunner(self.path)
        self.n_labels = n_labels
        self.precision = name

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
        probs = sigmoid(self._runner.run(np.ascontiguousarray(images)))
        if probs.shape != (images.shape[0], self.n_labels):
            raise FastPathError(
                f"model returned scores of shape {probs.shape}, expected "
                f"({images.shape[0]}, {self.n_labels}): model and vocab do not match"
            )
        return probs


class _GilHoldingRunner:
    def __init__(self, path: Path) -> None:
        import torch

        self._loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._loader.run([torch.from_numpy(x)])[0].float().numpy()


def _torch_dir() -> Path | None:
    """torch's package folder, found without importing torch; None if it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    return None if spec is None or spec.origin is None else Path(spec.origin).parent


@functools.lru_cache(maxsize=1)
def _libtorch() -> _Libtorch:
    """Loaded and declared once per process, whatever the number of compiled models."""
    return _Libtorch()


class _Libtorch:
    """libtorch's C shim for tensors (`aoti_torch/c/shim.h`), loaded with ctypes.

    RTLD_GLOBAL, so the model library's undefined `aoti_torch_*` symbols resolve to it; if
    torch is imported (now or later) the same files are shared, not loaded twice.
    """

    def __init__(self) -> None:
        import ctypes as C

        package = _torch_dir()
        if package is None:
            raise OSError("torch is not installed: a compiled model needs its libtorch")
        lib_dir = package / "lib"
        cpu = C.CDLL(str(lib_dir / "libtorch_cpu.so"), mode=C.RTLD_GLOBAL)
        C.CDLL(str(lib_dir / "libtorch.so"), mode=C.RTLD_GLOBAL)  # the model library needs it
        h, i64p = C.c_void_p, C.POINTER(C.c_int64)
        for name in ("uint8", "float32", "bfloat16"):
            getattr(cpu, f"aoti_torch_dtype_{name}").restype = C.c_int32
        cpu.aoti_torch_device_type_cpu.restype = C.c_int32
        self.uint8, self.float32 = cpu.aoti_torch_dtype_uint8(), cpu.aoti_torch_dtype_float32()
        self.bfloat16, self.device_cpu = (
            cpu.aoti_torch_dtype_bfloat16(),
            cpu.aoti_torch_device_type_cpu(),
        )
        signatures: dict[str, list[Any]] = {
            "aoti_torch_create_tensor_from_blob": [
                C.c_void_p, C.c_int64, i64p, i64p, C.c_int64, C.c_int32, C.c_int32, C.c_int32,
                C.POINTER(h),
            ],
            "aoti_torch_get_data_ptr": [h, C.POINTER(C.c_void_p)],
            "aoti_torch_get_dim": [h, C.POINTER(C.c_int64)],
            "aoti_torch_get_sizes": [h, C.POINTER(i64p)],
            "aoti_torch_get_strides": [h, C.POINTER(i64p)],
            "aoti_torch_get_dtype": [h, C.POINTER(C.c_int32)],
            "aoti_torch_delete_tensor_object": [h],
        }  # fmt: skip
        for name, argtypes in signatures.items():
            fn = getattr(cpu, name)
            fn.argtypes, fn.restype = argtypes, C.c_int32
        self.cpu = cpu

    def wrap(self, x: np.ndarray) -> Any:
        """A tensor handle over `x`'s memory (borrowed: keep `x` alive while it is used)."""
        import ctypes as C

        sizes = (C.c_int64 * x.ndim)(*x.shape)
        strides = (C.c_int64 * x.ndim)(*(s // x.itemsize for s in x.strides))
        handle = C.c_void_p()
        _check(
            self.cpu.aoti_torch_create_tensor_from_blob(
                x.ctypes.data, x.ndim, sizes, strides, 0, self.uint8, self.device_cpu, 0,
                C.byref(handle),
            ),
            "wrap the input batch",
        )  # fmt: skip
        return handle

    def to_numpy(self, handle: Any) -> np.ndarray:
        """A float32 copy of a contiguous fp32 or bf16 tensor; the handle is then deleted."""
        import ctypes as C

        cpu = self.cpu
        try:
            dim, dtype, data = C.c_int64(), C.c_int32(), C.c_void_p()
            sizes, strides = C.POINTER(C.c_int64)(), C.POINTER(C.c_int64)()
            _check(cpu.aoti_torch_get_dim(handle, C.byref(dim)), "read the output")
            _check(cpu.aoti_torch_get_sizes(handle, C.byref(sizes)), "read the output")
            _check(cpu.aoti_torch_get_strides(handle, C.byref(strides)), "read the output")
            _check(cpu.aoti_torch_get_dtype(handle, C.byref(dtype)), "read the output")
            _check(cpu.aoti_torch_get_data_ptr(handle, C.byref(data)), "read the output")
            shape = tuple(sizes[i] for i in range(dim.value))
            contiguous = np.empty(shape, np.uint8).strides  # element strides for 1-byte items
            if any(strides[i] != contiguous[i] for i in range(dim.value) if shape[i] > 1):
                raise FastPathError(f"the compiled model returned a non-contiguous {shape} output")
            n = int(np.prod(shape))
            if dtype.value == self.float32:
                flat = np.ctypeslib.as_array(C.cast(data, C.POINTER(C.c_float)), (n,)).copy()
            elif dtype.value == self.bfloat16:
                raw = np.ctypeslib.as_array(C.cast(data, C.POINTER(C.c_uint16)), (n,))
                flat = (raw.astype(np.uint32) << 16).view(np.float32)
            else:
                raise FastPathError(f"the compiled model returned dtype code {dtype.value}")
            return flat.reshape(shape)
        finally:
            cpu.aoti_torch_delete_tensor_object(handle)


def _check(code: int, what: str) -> None:
    if code:
        raise FastPathError(f"libtorch could not {what} (error {code}; see stderr)")


class _CRunner:
    """One AOTInductor model container, driven through its C interface with ctypes."""

    def __init__(self, package: Path) -> None:
        import ctypes
        import zipfile

        self._torch = _libtorch()  # first: the model library links against libtorch
        with zipfile.ZipFile(package) as zf:
            libs = [n for n in zf.namelist() if n.endswith(".so") and "/aotinductor/model/" in n]
            if len(libs) != 1:
                raise KeyError(f"{len(libs)} model libraries in the package, expected 1")
            with tempfile.TemporaryDirectory(prefix="multitag-aoti-") as tmp:
                lib = ctypes.CDLL(zf.extract(libs[0], tmp))  # mapped: the file may go
        handle_t = ctypes.c_void_p
        lib.AOTInductorModelContainerCreateWithDevice.argtypes = [
            ctypes.POINTER(handle_t), ctypes.c_size_t, ctypes.c_char_p, ctypes.c_char_p,
        ]  # fmt: skip
        lib.AOTInductorModelContainerGetNumOutputs.argtypes = [
            handle_t, ctypes.POINTER(ctypes.c_size_t),
        ]  # fmt: skip
        lib.AOTInductorModelContainerRun.argtypes = [
            handle_t, ctypes.POINTER(handle_t), ctypes.c_size_t, ctypes.POINTER(handle_t),
            ctypes.c_size_t, handle_t, handle_t,
        ]  # fmt: skip
        lib.AOTInductorModelContainerDelete.argtypes = [handle_t]
        handle, n_out = handle_t(), ctypes.c_size_t()
        if lib.AOTInductorModelContainerCreateWithDevice(ctypes.byref(handle), 1, b"cpu", None):
            raise RuntimeError("the model container could not be created (see stderr)")
        lib.AOTInductorModelContainerGetNumOutputs(handle, ctypes.byref(n_out))
        if n_out.value != 1:
            lib.AOTInductorModelContainerDelete(handle)
            raise RuntimeError(f"the model has {n_out.value} outputs, expected 1")
        self._lib, self._handle, self._handle_t = lib, handle, handle_t

    def run(self, x: np.ndarray) -> np.ndarray:
        # The container steals (deletes) the input handle; `x` owns the memory and outlives
        # the call. The output handle is ours: `to_numpy` copies and deletes it.
        inputs = (self._handle_t * 1)(self._torch.wrap(x))
        outputs = (self._handle_t * 1)()
        if self._lib.AOTInductorModelContainerRun(self._handle, inputs, 1, outputs, 1, None, None):
            raise FastPathError(f"the compiled model failed on a batch of {tuple(x.shape)}")
        return self._torch.to_numpy(outputs[0])

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            self._lib.AOTInductorModelContainerDelete(handle)


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
) -> Any:
    """The scorer called `name` (one of the candidates), from the record's verified files."""
    from multitag.inference.tagger import TorchScorer

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
) -> Any:
    """The scorer for candidate `name` over its model file (one checked against its sha256,
    or one just written by `measure_candidates`)."""
    if name == TORCH_BF16:
        return program_bf16_scorer(path, mean, std, n_labels)
    if name == AOTI_BF16:
        return AotiScorer(path, n_labels=n_labels)
    if name in (ORT_FP32, ORT_INT8):
        return OrtScorer(path, mean=mean, std=std, n_labels=n_labels, threads=threads, name=name)
    raise FastPathError(f"candidate {name!r} has no model file")


@dataclass
class Selection:
    """The scorer a tagger uses and why (goes to the log and the tagger)."""

    scorer: Any
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
    batch_size: int = CHECK_BATCH,
) -> Selection:
    """Pick the CPU scorer for `precision` in ("auto", "int8"); see the module docstring.

    `sample(n)` returns up to n model-ready uint8 images from the images to tag, or None
    when there are too few to check a fast path; it is only called when no record exists.
    Candidates are timed at `batch_size` when the record is built; the record is then
    reused whatever batch size later runs use.
    """
    if precision not in ("auto", "int8"):
        raise FastPathError(f"select_scorer handles auto and int8, not {precision!r}")
    n_labels = _n_labels(model, img_size)
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
            return Selection(make_scorer(TORCH_FP32, None, model, mean=mean, std=std,
                                         n_labels=n_labels), TORCH_FP32, msg, None)  # fmt: skip
        record = build_record(
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
            return Selection(make_scorer(TORCH_FP32, None, model, mean=mean, std=std,
                                         n_labels=n_labels), TORCH_FP32, msg, None)  # fmt: skip
    name, reason = choose_for_run(record, precision, bar)  # the bar may differ from the record's
    log.info("precision %s -> %s (%s)", precision, name, reason)
    scorer = make_scorer(name, record, model, mean=mean, std=std, n_labels=n_labels, root=root,
                         threads=threads)  # fmt: skip
    return Selection(scorer, name, reason, record)
