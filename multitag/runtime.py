"""Process-level settings for torch on small shared CPUs and for GPU workers.

Why a function and not module code: settings must be applied by the entry point (CLI, flow,
worker) *before* torch is imported, and importing this library must have no side effects.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from collections.abc import Iterable
from importlib import metadata

# Measured on 2 shared cores: PASSIVE stops OpenMP threads spinning between ops, which cut CPU
# time per epoch 2-3x when another process shares the machine.
_CPU_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}

# The libraries that shape a trained model, recorded in its metrics.json.
MODEL_LIBRARIES = (
    "multitag",
    "torch",
    "torchvision",
    "fastai",
    "fastcore",
    "timm",
    "numpy",
    "pandas",
    "pillow",
    "scikit-learn",
    "fsspec",
    "s3fs",
    "pyarrow",
    "prefect",
)


def configure_cpu_runtime(threads: int | None = None) -> int:
    """Apply CPU thread settings; returns the intra-op thread count torch will use.

    Env defaults only take effect if torch has not been imported yet, so call this first.
    torch is not imported here: a tagging run on an ONNX or compiled model never needs it
    (~2 s and ~300 MiB per process); OMP_NUM_THREADS carries the count to torch if it is
    imported later, and to the OpenMP of a compiled model loaded without torch.
    """
    for key, value in _CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    n = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or available_cpus()
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n


def cuda_possible() -> bool:
    """False when this machine certainly has no usable NVIDIA GPU, without importing torch.

    Why: `torch.cuda.is_available()` costs the torch import (seconds on a small CPU) in runs
    that would not use torch at all on a CPU-only machine.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0"))


def pick_device(preferred: str = "auto") -> str:
    """'cuda' if asked for or available (auto), else 'cpu'; a missing GPU asked for is an error."""
    if preferred == "cpu" or (preferred == "auto" and not cuda_possible()):
        return "cpu"
    import torch

    has_cuda = torch.cuda.is_available()
    if preferred == "cuda" and not has_cuda:
        raise RuntimeError(
            "device='cuda' was requested but no CUDA device is visible to torch; "
            "run on a GPU worker or pass device='auto'/'cpu'."
        )
    return "cuda" if has_cuda else "cpu"


def available_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware), not the host's total."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def library_versions(
    names: Iterable[str] = MODEL_LIBRARIES, *, loaded: bool = False
) -> dict[str, str]:
    """Python, the platform and the version of each named library that is installed.

    `loaded=False` reads each distribution's metadata without importing it: cheap enough for
    metrics.json (`names` are distribution names, e.g. "pillow"). `loaded=True` imports each
    one (`names` are then module names) and reads `__version__`, which carries the build's
    local label (torch "2.14.1+cu130" where its metadata says "2.14.1"): native code compiled
    against a library is keyed by the build that is actually loaded.
    """
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in names:
        if loaded:
            out[name] = str(importlib.import_module(name).__version__)
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # not installed: simply not part of this environment
    return out
