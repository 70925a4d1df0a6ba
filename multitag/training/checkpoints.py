"""Per-epoch training checkpoints under the storage root, so a killed retrain resumes.

Layout: `<home>/checkpoints/<stage_key>/epoch-<k>.pt` (k: 0-based index of the finished
epoch) plus `latest.json`, written last, which names the newest file, its sha256, the
history so far and the learning rate. Why under the storage root (fsspec, so `s3://` too):
a pre-empted pod loses its disk; the next pod (or the next run with the same dataset content
and parameters, hence the same stage key) finds the checkpoint where the registry lives.

Why sha256 + `weights_only=True`: a checkpoint is read back from shared storage; its bytes
are checked against latest.json before torch sees them, and torch only rebuilds tensors and
plain containers, never arbitrary objects. A checkpoint that fails either check is reported
and ignored (training starts again from epoch 0): it can cost time, never a wrong model.

torch is imported inside the functions that (de)serialise: `tasks.retrain` imports this
module for `checkpoint_location` and `is_infrastructure_failure` without training.
"""

from __future__ import annotations

import io
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from multitag import storage
from multitag.errors import MultitagError
from multitag.hashing import sha256_bytes

LATEST = "latest.json"
FORMAT = 1
# The newest two: if the newest were ever unreadable, the one before still bounds the loss.
KEEP = 2
_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.pt$")

log = logging.getLogger(__name__)


class CheckpointUnusable(Exception):
    """A checkpoint exists but cannot be trusted or does not fit; training starts afresh."""


@dataclass
class Checkpoint:
    epochs_done: int  # finished epochs: training resumes at this 0-based epoch index
    history: list[dict[str, Any]]
    lr: float
    state: dict[str, Any]  # "model", "opt", "rng" (tensors and plain containers only)


def checkpoint_location(home: str, stage_key: str) -> str:
    return storage.join(home, "checkpoints", stage_key)


def epoch_file(epoch: int) -> str:
    return f"epoch-{epoch}.pt"


def save_checkpoint(
    location: str, epoch: int, state: dict[str, Any], history: list[dict[str, Any]], lr: float
) -> str:
    """Write epoch `epoch`'s state, then latest.json (the commit point), then prune old files.

    Each write is whole or absent (storage.write_bytes_atomic), and latest.json goes last: a
    kill at any instant leaves latest.json naming a complete, hash-checked file.
    """
    import torch

    buf = io.BytesIO()
    torch.save(plain(state), buf)
    data = buf.getvalue()
    name = epoch_file(epoch)
    storage.write_bytes_atomic(storage.join(location, name), data)
    latest = {
        "format": FORMAT,
        "epochs_done": epoch + 1,
        "file": name,
        "sha256": sha256_bytes(data),
        "bytes": len(data),
        "lr": float(lr),
        "history": history,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json_atomic(storage.join(location, LATEST), latest)
    _prune(location, keep_from=epoch - KEEP + 1)
    return storage.join(location, name)


def load_checkpoint(location: str, map_location: str = "cpu") -> Checkpoint | None:
    """The newest checkpoint at `location`, hash-checked; None when there is none.

    Raises CheckpointUnusable when latest.json or the file it names is damaged or altered.
    """
    latest_uri = storage.join(location, LATEST)
    if not storage.exists(latest_uri):
        return None
    try:
        latest = storage.read_json(latest_uri)
        name = str(latest["file"])
        if latest.get("format") != FORMAT or not _EPOCH_FILE.match(name):
            raise CheckpointUnusable(f"{latest_uri}: unknown format or file name {name!r}")
        data = storage.read_bytes(storage.join(location, name))
        epochs_done, history, lr = int(latest["epochs_done"]), list(latest["history"]), latest["lr"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointUnusable(f"{latest_uri} cannot be read: {exc}") from exc
    if sha256_bytes(data) != latest["sha256"]:
        raise CheckpointUnusable(
            f"{storage.join(location, name)} does not match the sha256 in {latest_uri}: "
            "it changed after it was written"
        )
    if len(history) != epochs_done:
        raise CheckpointUnusable(f"{latest_uri}: {len(history)} history rows for {epochs_done}")
    import torch

    try:  # weights_only: tensors and plain containers only, never arbitrary objects
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # any unpickling refusal or damage: the file is not used
        raise CheckpointUnusable(f"{name} cannot be loaded safely: {exc}") from exc
    return Checkpoint(epochs_done=epochs_done, history=history, lr=float(lr), state=state)


def clear_checkpoints(location: str) -> None:
    """Remove the stage's checkpoints once its result is staged (train.json written)."""
    fs, path = storage.fs_and_path(location)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        return


def _prune(location: str, keep_from: int) -> None:
    fs, path = storage.fs_and_path(location)
    for entry in fs.ls(path, detail=False):
        m = _EPOCH_FILE.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if m and int(m.group(1)) < keep_from:
            storage.remove(storage.unstrip(fs, entry))


def plain(obj: Any) -> Any:
    """Containers as dict/list/tuple and numbers as Python or torch types: what
    `torch.load(weights_only=True)` accepts. fastai keeps optimizer hypers in fastcore `L`
    lists holding numpy floats, which the safe unpickler refuses."""
    import torch

    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, bytes, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "__iter__"):
        return [plain(v) for v in obj]
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch generators: a resumed run draws what an unbroken one would."""
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (str(kind), torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def as_tuples(obj: Any) -> Any:
    """random.setstate wants the nested tuples getstate gave (lists would be refused)."""
    if isinstance(obj, (list, tuple)):
        return tuple(as_tuples(v) for v in obj)
    return obj


# Infrastructure failures: the node, the network, the storage or the GPU failed, not the
# input. A retry on a fresh attempt (resuming from the checkpoint) can succeed. Message
# fragments of RuntimeErrors that torch raises for such failures:
_CRASH_MESSAGES = (
    "CUDA error",  # device fault, Xid, ECC, "unspecified launch failure"
    "CUDA driver",
    "cuDNN error",
    "NCCL",
    "DataLoader worker",  # "DataLoader worker (pid N) is killed by signal": the OOM killer
)


# A file that is missing or forbidden now is missing or forbidden on the next attempt too.
_MISSING = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_infrastructure_failure(exc: BaseException) -> bool:
    """Worth a retry: OS/storage/network errors and device or worker crashes.

    Never: this project's own errors (bad input, contract, integrity: the same input fails the
    same way), a missing or forbidden file, and CUDA out-of-memory (the same batch on the
    same card runs out again; lower batch_size instead).
    """
    if isinstance(exc, (MultitagError, *_MISSING)):
        return False
    if isinstance(exc, (OSError, ConnectionError, TimeoutError, EOFError)):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        if "out of memory" in text:
            return False
        return any(fragment in text for fragment in _CRASH_MESSAGES)
    return False
