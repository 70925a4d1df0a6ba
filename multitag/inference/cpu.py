"""What this machine's CPU and torch can run: feature flags, native bf16, torch's build.

Why a module of its own: a compiled candidate is native code for one CPU's vector ISA and one
torch build, so loading it on another is a SIGILL or an ABI break, not an exception; these
probes decide that without importing torch (~1.7 s) where they can.
"""

from __future__ import annotations

import sys
from pathlib import Path

from multitag._compat import torch as torch_compat

_NATIVE_BF16 = {"avx512_bf16", "amx_bf16"}
# gcc -m options whose /proc/cpuinfo name is not the option with "-" -> "_"
_FLAG_NAMES = {
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
}


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


def bf16_supported() -> bool:
    """Whether this CPU has native bf16 (AVX512-BF16 or AMX); emulated bf16 is slower.

    Read from the CPU's flags, so that tagging with a compiled model never imports torch just
    to ask (~1.7 s). Where the flags are unknown (not Linux): no. torch has no public check,
    and its private `_is_mkldnn_bf16_supported` also says yes for AVX-512 without bf16, where
    oneDNN emulates it, slower than fp32; so it was dropped (issue 16), at the cost of the
    bf16 candidates on non-Linux CPUs with native bf16 (int8 ONNX still runs there).
    """
    flags = cpu_flags()
    return bool(flags & _NATIVE_BF16) if flags is not None else False


def isa_flags(build_flags: str) -> list[str]:
    """gcc's `-mavx512f -mamx-tile ...` as /proc/cpuinfo flags: avx512f, amx_tile ..."""
    names = {o[2:].replace("-", "_") for o in build_flags.split() if o.startswith("-m")}
    return sorted(_FLAG_NAMES.get(n, n) for n in names)


def compiled_isa_flags() -> list[str]:
    """The CPU flags inductor's code for this CPU needs (what `compile_bf16` records)."""
    return isa_flags(torch_compat.vec_isa_build_flags())


def torch_version() -> str | None:
    """The installed torch's `__version__` (with its local part, e.g. +cu130), or None.

    From torch/version.py without importing torch (~1.7 s) unless it is already imported.
    """
    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)
    if torch_compat.torch_dir() is None:
        return None
    found = torch_compat.torch_version_from_file()
    if found is not None:
        return found
    import torch

    return str(torch.__version__)
