"""Multi-label training with fastai: the fastbook recipe, made reproducible and offline-safe.

DataBlock(ImageBlock, MultiCategoryBlock) over train.csv, `vision_learner` with
BCEWithLogitsLossFlat (sigmoid per label, so "none of these" is a legal answer), metrics
accuracy_multi and mAP; `fine_tune` from pretrained weights, `fit_one_cycle` from random init.

Only training code paths import this module (it imports fastai at the top). Everything an
exported learner refers to at load time lives in `multitag.training.models`, never here, so
`load_learner_file` works in a process that never trained. Reading train.csv into the table
fastai needs (and TrainingError) lives in `multitag.training.training_table`, re-exported here.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# Imported for their side effect: they patch Learner with to_channelslast, to_bf16/to_fp32,
# no_bar, and fit_one_cycle/fine_tune/lr_find.
import fastai.callback.channelslast
import fastai.callback.fp16
import fastai.callback.progress
import fastai.callback.schedule  # noqa: F401
import numpy as np
import pandas as pd
import torch
import torchvision
from fastai.callback.core import Callback
from fastai.data.block import DataBlock, MultiCategoryBlock
from fastai.data.transforms import ColReader, ColSplitter, Normalize
from fastai.learner import Learner, Recorder
from fastai.losses import BCEWithLogitsLossFlat
from fastai.metrics import AccumMetric, ActivationType, accuracy_multi
from fastai.torch_core import set_seed
from fastai.vision.augment import DihedralItem, Resize, ResizeMethod, aug_transforms
from fastai.vision.core import imagenet_stats
from fastai.vision.data import ImageBlock
from fastai.vision.learner import vision_learner
from fastcore.foundation import L

from multitag.config import TrainParams
from multitag.runtime import available_cpus, configure_cpu_runtime, pick_device
from multitag.training import checkpoints

# Also what an unpickled learner refers to (its builders and metrics): importing it here
# is what lets `load_learner_file` unpickle in a process that never trained.
from multitag.training.models import mean_average_precision, shapes_cnn
from multitag.training.training_table import (
    REQUIRED_COLUMNS,
    TrainingError,
    cap_validation,
    label_vocab,
    normalise_table,
    read_training_table,
)

# Re-exported: callers reach the table helpers and TrainingError through this module too.
__all__ = [
    "REQUIRED_COLUMNS",
    "PretrainedWeightsUnavailable",
    "TrainResult",
    "TrainingError",
    "build_dataloaders",
    "build_learner",
    "cap_validation",
    "export_learner",
    "inference_spec",
    "label_vocab",
    "load_learner_file",
    "normalise_table",
    "pick_training_device",
    "predict_files",
    "predict_validation",
    "read_training_table",
    "resolve_arch",
    "train",
]

_INFO_ATTR = "multitag_info"  # dict stored on the learner; travels inside model.pkl

log = logging.getLogger(__name__)


class PretrainedWeightsUnavailable(TrainingError):
    """pretrained=True, but the weights are neither on disk nor downloadable (offline)."""


@dataclass
class TrainResult:
    learner: Learner
    vocab: list[str]
    history: list[dict[str, Any]]
    wall_time_s: float
    device: str
    n_train: int
    n_valid: int
    lr: float  # the peak learning rate used (lr_find's suggestion when params.lr is None)
    resumed_at_epoch: int = 0  # 0-based epoch this run started training at (0: from scratch)


# --------------------------------------------------------------------------- model choice


def resolve_arch(name: str) -> Callable[..., Any] | str:
    """torchvision builder, 'shapes_cnn', or a timm name (string: fastai builds it via timm)."""
    if name == "shapes_cnn":
        return shapes_cnn
    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model_builder(name)
    import timm  # optional (as fastai treats it): only timm architecture names need it

    if timm.is_model(name):
        return name
    raise TrainingError(
        f"Unknown arch {name!r}: use 'shapes_cnn', a torchvision classification model "
        "(resnet18, resnet34, resnet50, convnext_tiny, ...) or a timm model name "
        "(see timm.list_models())."
    )


def _pretrained_error(arch: str, err: BaseException) -> PretrainedWeightsUnavailable:
    """Say exactly where the weights file must go for fastai to find it offline."""
    if arch in torchvision.models.list_models(module=torchvision.models):
        url = torchvision.models.get_model_weights(arch).DEFAULT.url
        fname = url.rsplit("/", 1)[-1]
        where = Path(torch.hub.get_dir()) / "checkpoints" / fname
        return PretrainedWeightsUnavailable(
            f"pretrained=True needs ImageNet weights for {arch!r}, which could not be "
            f"downloaded ({err}). To train offline, place the file {fname} (from {url}) in "
            f"$TORCH_HOME/hub/checkpoints/ (here: {where}); torchvision loads it from there "
            "without a network. Or pass pretrained=False to train from random init."
        )
    return PretrainedWeightsUnavailable(
        f"pretrained=True needs weights for timm model {arch!r}, which could not be "
        f"downloaded ({err}). timm reads them from the Hugging Face cache: on a connected "
        f"machine run `huggingface-cli download timm/{arch}` and copy $HF_HOME/hub here "
        "(set HF_HUB_OFFLINE=1 to skip the retries), or pass pretrained=False."
    )


def _offline_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [urllib.error.URLError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError

        errors.append(LocalEntryNotFoundError)
    except ImportError:  # timm without huggingface_hub cannot download at all: nothing to add
        pass
    return tuple(errors)


# --------------------------------------------------------------------------- data + learner


def pick_training_device(preferred: str) -> str:
    device = pick_device(preferred)
    if device == "cpu":
        configure_cpu_runtime()
    return device


def build_dataloaders(
    dataset_dir: Path, table: pd.DataFrame, params: TrainParams, device: str
) -> Any:
    """The fastbook multi-label DataBlock; squish-resize so tagging can mirror it exactly."""
    vocab = label_vocab(table)
    item_tfms: list[Any] = [Resize(params.img_size, method=ResizeMethod.Squish)]
    batch_tfms: list[Any] = []
    if params.augment == "standard":
        batch_tfms += aug_transforms(max_rotate=10.0, max_zoom=1.1, max_warp=0.1)
    elif params.augment == "dihedral":
        item_tfms.append(DihedralItem(p=1.0))  # a RandTransform: training split only
    dblock = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock(vocab=vocab)),
        get_x=ColReader("fname", pref=Path(dataset_dir) / "train"),
        get_y=ColReader("labels", label_delim=" "),
        splitter=ColSplitter("is_valid"),
        item_tfms=item_tfms,
        batch_tfms=batch_tfms,
    )
    n_train = int((~table["is_valid"]).sum())
    # The training loader drops the last partial batch: a batch bigger than the set is empty.
    bs = max(1, min(params.batch_size, n_train))
    return dblock.dataloaders(
        table, bs=bs, num_workers=_num_workers(params, device), device=torch.device(device)
    )


def _num_workers(params: TrainParams, device: str) -> int:
    if params.num_workers is not None:
        return params.num_workers
    if device == "cpu":
        return 0  # measured on 2 cores: worker processes cost more than they overlap
    return min(8, available_cpus())


def build_learner(dls: Any, params: TrainParams) -> Learner:
    arch = resolve_arch(params.arch)
    map_metric = AccumMetric(
        mean_average_precision,
        activation=ActivationType.Sigmoid,
        flatten=False,
        to_np=True,
        invert_arg=True,
        name="mAP",
    )
    try:
        learn = vision_learner(
            dls,
            arch,
            pretrained=params.pretrained,
            loss_func=BCEWithLogitsLossFlat(),
            metrics=[accuracy_multi, map_metric],
            ps=params.head_dropout,
        )
    except _offline_errors() as err:
        raise _pretrained_error(params.arch, err) from err
    _ensure_normalize(learn.dls)
    return learn


def _ensure_normalize(dls: Any) -> None:
    """fastai adds Normalize only for pretrained models; random init needs it just as much."""
    if not any(isinstance(t, Normalize) for t in dls.after_batch.fs):
        dls.add_tfms([Normalize.from_stats(*imagenet_stats)], "after_batch")


class _EpochReporter(Callback):
    """Turns the Recorder's row for each epoch into a dict; runs right after Recorder.

    `skip_to`: epochs below it were finished before a resume; fastai's SkipToEpoch cancels
    them, but `after_epoch` still fires for them (with an empty Recorder row): not reported.
    """

    order = Recorder.order + 1

    def __init__(self, history: list[dict[str, Any]], on_epoch: Callable[[dict], None] | None):
        self.history, self.on_epoch = history, on_epoch
        self.skip_to = 0

    def before_epoch(self) -> None:
        self._t0 = time.perf_counter()

    def after_epoch(self) -> None:
        if self.epoch < self.skip_to:
            return
        names = [str(n) for n in self.recorder.metric_names[1:-1]]  # drop 'epoch' and 'time'
        values = [float(v) for v in self.recorder.values[-1]]
        row: dict[str, Any] = {"epoch": len(self.history) + 1}
        row.update(zip(names, values, strict=True))
        row["time_s"] = round(time.perf_counter() - self._t0, 3)
        self.history.append(row)
        if self.on_epoch is not None:
            self.on_epoch(dict(row))


class _ProgressReporter(Callback):
    """Calls `on_progress(fraction of all epochs done)` after each training batch.

    Why: an epoch on a real dataset takes minutes; a per-epoch row alone leaves the UI still.
    Counts epochs itself (after_epoch also runs for epochs a resumed fit skips), so the
    fraction spans fine_tune's frozen and unfrozen fits.
    """

    def __init__(self, on_progress: Callable[[float], None], n_epochs: int):
        self.on_progress, self.n_epochs, self.done = on_progress, max(n_epochs, 1), 0

    def after_batch(self) -> None:
        if self.training and self.n_iter:
            self.on_progress(min((self.done + (self.iter + 1) / self.n_iter) / self.n_epochs, 1.0))

    def after_epoch(self) -> None:
        self.done += 1


class _Checkpointer(Callback):
    """After every finished epoch: model, optimizer and RNG state to `location` (fsspec).

    Runs after _EpochReporter, so the history it stores includes the epoch just finished.
    `offset` turns a phase's epoch into the run's (fine_tune's unfrozen phase starts after the
    frozen one); `skip_to` as in _EpochReporter. A failed write is logged, not raised:
    checkpoints are insurance, and the training itself is still sound.
    """

    order = _EpochReporter.order + 1

    def __init__(self, location: str, history: list[dict[str, Any]], peak_lr: float):
        self.location, self.history, self.peak_lr = location, history, peak_lr
        self.offset, self.skip_to = 0, 0

    def after_epoch(self) -> None:
        if self.epoch < self.skip_to:
            return
        state = {
            "model": self.learn.model.state_dict(),
            "opt": self.learn.opt.state_dict(),
            "rng": {
                **checkpoints.rng_state(),
                "loaders": [dl.rng.getstate() for dl in self.dls.loaders],
            },
        }
        try:
            checkpoints.save_checkpoint(
                self.location, self.offset + self.epoch, state, self.history, self.peak_lr
            )
        except OSError as exc:
            log.warning("checkpoint of epoch %d not written: %s", self.offset + self.epoch, exc)


def _read_checkpoint(location: str, device: str) -> checkpoints.Checkpoint | None:
    """The checkpoint to resume from, or None (none there, or unusable: logged, not fatal)."""
    try:
        return checkpoints.load_checkpoint(location, map_location=device)
    except checkpoints.CheckpointUnusable as exc:
        log.warning("not resuming from %s: %s; training from epoch 0", location, exc)
        return None


def _resume(learn: Learner, location: str, device: str) -> checkpoints.Checkpoint | None:
    """The checkpoint at `location`, loaded into `learn`; None: train from epoch 0."""
    ckpt = _read_checkpoint(location, device)
    return ckpt if ckpt is not None and _apply_checkpoint(learn, ckpt) else None


def _apply_checkpoint(learn: Learner, ckpt: checkpoints.Checkpoint) -> bool:
    """Load model and optimizer state into `learn`, after checking that they fit it.

    Checked first (names and shapes; optimizer group and parameter counts), so a misfit
    leaves the fresh learner untouched and training starts from epoch 0 instead.
    """
    model_state, opt_state = ckpt.state["model"], ckpt.state["opt"]
    own = learn.model.state_dict()
    fits = set(own) == set(model_state) and all(
        tuple(own[k].shape) == tuple(model_state[k].shape) for k in own
    )
    if learn.opt is None:
        learn.create_opt()
    n_params = sum(len(pg) for pg in learn.opt.param_lists)
    shape = (len(opt_state["hypers"]), len(opt_state["state"]))
    if not fits or shape != (len(learn.opt.param_lists), n_params):
        log.warning("the checkpoint does not fit this model; training from epoch 0")
        return False
    learn.model.load_state_dict(model_state)
    learn.opt.load_state_dict({"hypers": L(opt_state["hypers"]), "state": opt_state["state"]})
    return True


def _restore_rngs(learn: Learner, rng: dict[str, Any]) -> None:
    checkpoints.restore_rng_state(rng)
    for dl, state in zip(learn.dls.loaders, rng["loaders"], strict=True):
        dl.rng.setstate(checkpoints.as_tuples(state))


def _fit(learn: Learner, params: TrainParams, lr: float, cbs: list[Callback], start: int) -> None:
    """fastai's fit_one_cycle / fine_tune, resuming at run epoch `start` (0: from scratch).

    fit_one_cycle(start_epoch=k) adds fastai's SkipToEpoch, which cancels epochs < k before
    any batch runs; the one-cycle schedule stays right because TrainEvalCallback sets
    pct_train = epoch / n_epoch at the start of each training phase. fine_tune is two
    one-cycle fits (frozen for freeze_epochs, then unfrozen for epochs), and fastai's own
    fine_tune would pass one start_epoch to both; so it is spelled out here with fastai
    2.8.12's arguments (pct_start 0.99 frozen; base_lr halved, lr_mult 100, pct_start 0.3,
    div 5.0 unfrozen) and the run's epoch split between the phases: a run killed in the
    frozen phase resumes there; one killed later skips the whole frozen phase and resumes
    inside the unfrozen one.
    """

    def phase(offset: int, n_epoch: int) -> int:
        skip = min(max(0, start - offset), n_epoch)
        for cb in cbs:
            if isinstance(cb, (_EpochReporter, _Checkpointer)):
                cb.skip_to = skip
            if isinstance(cb, _Checkpointer):
                cb.offset = offset
        return skip

    if not params.pretrained:
        learn.fit_one_cycle(params.epochs, lr, cbs=cbs, start_epoch=phase(0, params.epochs))
        return
    frozen = params.freeze_epochs
    learn.freeze()
    learn.fit_one_cycle(frozen, slice(lr), pct_start=0.99, cbs=cbs, start_epoch=phase(0, frozen))
    learn.unfreeze()
    half = lr / 2
    learn.fit_one_cycle(
        params.epochs, slice(half / 100, half), pct_start=0.3, div=5.0, cbs=cbs,
        start_epoch=phase(frozen, params.epochs),
    )  # fmt: skip


def _use_gpu_speedups(learn: Learner) -> None:
    """bf16 autocast where the GPU supports it (no loss scaling needed), else fp16."""
    amp_mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    learn.to_channelslast(use_amp=True, amp_mode=amp_mode)


def _find_lr(learn: Learner) -> float:
    """lr_find saves and restores a temporary checkpoint under learn.path: keep it in a tmp dir."""
    old_path = learn.path
    with tempfile.TemporaryDirectory(prefix="multitag-lrfind-") as tmp:
        learn.path = Path(tmp)
        try:
            with learn.no_bar(), learn.no_logging():
                suggestion = learn.lr_find(show_plot=False)
        finally:
            learn.path = old_path
    lr = float(suggestion.valley)
    if not math.isfinite(lr) or lr <= 0:
        raise TrainingError(f"lr_find suggested an unusable learning rate ({lr}); pass lr.")
    return lr


# --------------------------------------------------------------------------- public API


def train(
    dataset_dir: Path,
    params: TrainParams,
    *,
    on_epoch: Callable[[dict], None] | None = None,
    table: pd.DataFrame | None = None,
    on_progress: Callable[[float], None] | None = None,
    checkpoint_dir: str | None = None,
) -> TrainResult:
    """Train on dataset_dir (PASCAL layout). `table` may be a contract report's parsed table.

    With `checkpoint_dir` (fsspec URL), every finished epoch is checkpointed there, and a
    checkpoint already there is resumed: its model, optimizer, RNG state, learning rate and
    history are restored and training continues at the next epoch (see `_fit`), so the
    history still has one row per epoch of the whole run. The caller keys the folder by data
    and parameters (retraining.stage_key) and removes it once the result is saved.
    """
    t0 = time.perf_counter()
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "train").is_dir():
        raise TrainingError(f"{dataset_dir}/train/ not found: images must sit under train/.")
    table = read_training_table(dataset_dir) if table is None else normalise_table(table)
    table = cap_validation(table, params.max_valid_images, params.seed)
    if not label_vocab(table):
        raise TrainingError(f"{dataset_dir}/train.csv has no labels at all: nothing to learn.")
    if params.pretrained and params.arch == "shapes_cnn":
        raise TrainingError("shapes_cnn has no pretrained weights: set pretrained=False.")
    device = pick_training_device(params.device)
    set_seed(params.seed, reproducible=True)
    dls = build_dataloaders(dataset_dir, table, params, device)
    learn = build_learner(dls, params)
    if device == "cuda":
        _use_gpu_speedups(learn)
    resume = _resume(learn, checkpoint_dir, device) if checkpoint_dir else None
    if resume is not None:
        lr = resume.lr  # the schedule must peak where the interrupted run's did
    else:
        lr = params.lr if params.lr is not None else _find_lr(learn)
    history: list[dict[str, Any]] = list(resume.history) if resume else []
    cbs: list[Callback] = [_EpochReporter(history, on_epoch)]
    if checkpoint_dir:
        cbs.append(_Checkpointer(checkpoint_dir, history, lr))
    if on_progress is not None:
        n_epochs = params.epochs + (params.freeze_epochs if params.pretrained else 0)
        cbs.append(_ProgressReporter(on_progress, n_epochs))
    start = resume.epochs_done if resume else 0
    if resume is not None:
        total = params.epochs + (params.freeze_epochs if params.pretrained else 0)
        log.info(
            "resuming from checkpoint %s: %d of %d epochs done, training from epoch %d",
            checkpoint_dir, start, total, start,
        )  # fmt: skip
        _restore_rngs(learn, resume.state["rng"])
    with learn.no_bar(), learn.no_logging():
        _fit(learn, params, lr, cbs, start)
    vocab = [str(v) for v in learn.dls.vocab]
    setattr(
        learn,
        _INFO_ATTR,
        {
            "arch": params.arch,
            "img_size": params.img_size,
            "vocab": vocab,
            "resize_method": "squish",
        },
    )
    return TrainResult(
        learner=learn,
        vocab=vocab,
        history=history,
        wall_time_s=round(time.perf_counter() - t0, 3),
        device=device,
        n_train=len(learn.dls.train_ds),
        n_valid=len(learn.dls.valid_ds),
        lr=float(lr),
        resumed_at_epoch=start,
    )


def predict_validation(learner: Learner) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores and true labels of the validation split, both (N, L) in vocab order."""
    if len(learner.dls.valid_ds) == 0:
        raise TrainingError(
            "this learner has no validation items (an exported/loaded learner keeps none); "
            "call predict_validation on the learner returned by train()."
        )
    with learner.no_bar():
        probs, targets = learner.get_preds(dl=learner.dls.valid)
    return probs.float().numpy().astype(np.float32), targets.numpy() > 0.5


def predict_files(learner: Learner, files: Sequence[Path], batch_size: int = 64) -> np.ndarray:
    """Sigmoid scores (N, L) for image files, with the validation transforms."""
    n_labels = len(learner.dls.vocab)
    if len(files) == 0:
        return np.zeros((0, n_labels), dtype=np.float32)
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) not found, first: {missing[0]}")
    dl = learner.dls.test_dl([Path(f) for f in files], bs=batch_size, num_workers=0)
    with learner.no_bar():
        probs, _ = learner.get_preds(dl=dl)
    return probs.float().numpy().astype(np.float32)


def export_learner(learner: Learner, path: Path, thresholds: np.ndarray | float) -> Path:
    """Set loss_func.thresh (so fastai's own `predict` applies our thresholds), then export.

    A per-label tensor works because BCEWithLogitsLossFlat.decodes is `probs > thresh`,
    which broadcasts over the label axis. Written to a temporary name, then renamed.
    """
    thresh = _threshold_value(thresholds, len(learner.dls.vocab))
    learner.loss_func.thresh = thresh
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        learner.export(tmp.absolute())  # absolute: fastai joins learner.path / fname
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _threshold_value(thresholds: np.ndarray | float, n_labels: int) -> float | torch.Tensor:
    arr = np.asarray(thresholds, dtype=np.float32)
    if arr.ndim == 0:
        values, result = arr.reshape(1), float(arr)
    elif arr.shape == (n_labels,):
        values, result = arr, torch.from_numpy(arr.copy())
    else:
        raise ValueError(
            f"thresholds must be a float or one value per label ({n_labels}); "
            f"got shape {arr.shape}."
        )
    if not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"thresholds are probabilities and must lie in [0, 1]; got {values}.")
    return result


def load_learner_file(path: Path | BinaryIO, cpu: bool = True) -> Learner:
    """Unpickle an exported learner. Only for files whose sha256 was checked (see registry).

    Mirrors fastai's `load_learner`, which hides an ImportError (say, timm not installed)
    behind an UnboundLocalError; here the real error propagates. A binary file object (the
    registry passes a BytesIO of the bytes it hashed) is read as it is, never re-opened.
    """
    map_location = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    source = path if hasattr(path, "read") else Path(path)
    learn = torch.load(source, map_location=map_location, weights_only=False)
    if not isinstance(learn, Learner):
        raise TrainingError(f"{path} does not hold a fastai Learner (got {type(learn).__name__}).")
    if cpu:
        learn.dls.cpu()
        if hasattr(learn, "channels_last"):
            learn = learn.to_contiguous(to_fp32=True)
        elif hasattr(learn, "mixed_precision"):
            learn = learn.to_fp32()
    return learn


def inference_spec(learner: Learner) -> dict[str, Any]:
    """What a plain-torch tagger needs to preprocess exactly as training did."""
    info = getattr(learner, _INFO_ATTR, None)
    if info is None:
        raise TrainingError(
            "learner was not produced by multitag.training.learner.train (no info)."
        )
    norms = [t for t in learner.dls.after_batch.fs if isinstance(t, Normalize)]
    if len(norms) != 1:
        raise TrainingError(f"expected exactly one Normalize transform, found {len(norms)}.")
    return {
        "img_size": int(info["img_size"]),
        "mean": [float(v) for v in norms[0].mean.flatten().cpu()],
        "std": [float(v) for v in norms[0].std.flatten().cpu()],
        "vocab": [str(v) for v in learner.dls.vocab],
        "arch": str(info["arch"]),
        "resize_method": str(info["resize_method"]),
    }
