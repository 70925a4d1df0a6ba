"""Process-level settings for torch on small shared CPUs and for GPU workers.

Why a function and not module code: settings must be applied by the entry point (CLI, flow,
worker) *before* torch is imported, and importing this library must have no side effects.
"""

from __future__ import annotations

import os

# Measured on 2 shared cores: PASSIVE stops OpenMP threads spinning between ops, which cut CPU
# time per epoch 2-3x when another process shares the machine.
_CPU_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_cpu_runtime(threads: int | None = None) -> int:
    """Apply CPU thread settings; returns the intra-op thread count torch will use.

    Env defaults only take effect if torch has not been imported yet, so call this first.
    """
    for key, value in _CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    n = threads or available_cpus()
    import torch

    torch.set_num_threads(n)
    return n


def pick_device(preferred: str = "auto") -> str:
    """'cuda' if asked for or available (auto), else 'cpu'; a missing GPU asked for is an error."""
    import torch

    if preferred == "cpu":
        return "cpu"
    has_cuda = torch.cuda.is_available()
    if preferred == "cuda" and not has_cuda:
        raise RuntimeError("device='cuda' was requested but no CUDA device is visible to torch; "
                           "run on a GPU worker or pass device='auto'/'cpu'.")
    return "cuda" if has_cuda else "cpu"


def available_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware), not the host's total."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
