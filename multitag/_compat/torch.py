"""The private torch internals multitag uses, each verified on `VERIFIED_TORCH` only.

What is here, and why each is worth its risk (measured on 2 shared cores, torch 2.14.1;
benchmarks/RESULTS.md, "issue 16: private torch APIs"):

- `CRunner` + `Libtorch`: an AOTInductor package's model library driven through its C
  interface (`aoti_runtime/interface.h`) and libtorch's C shim (`aoti_torch/c/shim.h`) with
  ctypes. The public loader (`torch._inductor.aoti_load_package`) imports torch's Python
  package (~1.7 s and ~260 MB per process) and holds the GIL for the whole forward pass, so
  the tagger's decode threads stop while the model runs; through ctypes the GIL is released
  and decoding overlaps the model. Hand-written signatures crash the process (not raise)
  when the C side changes, so they run only where `c_runner_canary()` finds every prototype
  in the installed torch's headers exactly as verified; anything else takes the public loader.
- `torch_version_from_file`: torch/version.py read with a regex. `importlib.metadata` says
  "2.14.1" where `torch.__version__` says "2.14.1+cu130" (the local part names the build,
  and a compiled model is native code for one build); importing torch to ask costs ~1.7 s.
- `aoti_compile_and_package` / `aoti_load_package`: AOTInductor's documented entry points
  (torch's AOTInductor tutorial), but they live in the private-looking `torch._inductor`
  namespace, so they are called only from here. They compile and load the bf16 package the
  fast path picks on CPUs with native bf16 (`aoti-bf16`: 99.55-99.68% agreement, the fastest
  scorer on such CPUs in benchmarks/RESULTS.md).
- `vec_isa_build_flags`: the `-m` options inductor compiles a package with
  (`torch._inductor.cpu_vec_isa`). They become the CPU flags a package requires; a guessed
  list that misses one lets a CPU without it load the package and die of SIGILL.
"""

from __future__ import annotations

import ctypes as C
import functools
import importlib.metadata
import importlib.util
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from multitag.errors import RunFailedError

VERIFIED_TORCH = frozenset({"2.14.1"})  # public version (no local part) of the installed torch


class CompatError(RunFailedError, RuntimeError):
    """A private torch internal is not as verified; callers take the public path instead."""


def installed_torch() -> str | None:
    """The installed torch's public version (from its metadata, torch not imported)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_dir() -> Path | None:
    """torch's package folder, found without importing torch; None if it is not installed."""
    spec = importlib.util.find_spec("torch")
    return None if spec is None or spec.origin is None else Path(spec.origin).parent


# ======================================================================= torch/version.py


def torch_version_from_file() -> str | None:
    """`__version__` of torch/version.py (local part included), or None if it cannot be read."""
    package = torch_dir()
    if package is None:
        return None
    try:
        text = (package / "version.py").read_text()
    except OSError:
        return None
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return found.group(1) if found else None


# ============================================================== inductor's vector ISA flags


def aoti_compile_and_package(program: Any, package_path: str, **inductor_configs: Any) -> str:
    """Compile an exported program into an AOTInductor package (imports torch._inductor)."""
    import torch._inductor

    return str(
        torch._inductor.aoti_compile_and_package(
            program, package_path=package_path, inductor_configs=inductor_configs
        )
    )


def aoti_load_package(path: str) -> Any:
    """torch's own loader of an AOTInductor package: a callable model (imports torch)."""
    import torch._inductor

    return torch._inductor.aoti_load_package(path)


def vec_isa_build_flags() -> str:
    """The `-m...` options inductor builds this CPU's kernels with (imports torch._inductor)."""
    from torch._inductor import cpu_vec_isa

    return str(cpu_vec_isa.pick_vec_isa().build_arch_flags())


# ================================================= ctypes driver of an AOTInductor package

# The C prototypes the ctypes declarations below were written from, as the headers of the
# verified torch declare them (comments dropped, whitespace collapsed).
_SHIM_H = "include/torch/csrc/inductor/aoti_torch/c/shim.h"
_INTERFACE_H = "include/torch/csrc/inductor/aoti_runtime/interface.h"
_VERIFIED_PROTOTYPES: dict[str, dict[str, str]] = {
    _SHIM_H: {
        "aoti_torch_dtype_uint8": "int32_t ()",
        "aoti_torch_dtype_float32": "int32_t ()",
        "aoti_torch_dtype_bfloat16": "int32_t ()",
        "aoti_torch_device_type_cpu": "int32_t ()",
        "aoti_torch_create_tensor_from_blob": (
            "AOTITorchError (void* data, int64_t ndim, const int64_t* sizes_ptr, const int64_t*"
            " strides_ptr, int64_t storage_offset, int32_t dtype, int32_t device_type, int32_t"
            " device_index, AtenTensorHandle* ret)"
        ),
        "aoti_torch_get_data_ptr": "AOTITorchError (AtenTensorHandle tensor, void** ret_data_ptr)",
        "aoti_torch_get_dim": "AOTITorchError (AtenTensorHandle tensor, int64_t* ret_dim)",
        "aoti_torch_get_sizes": "AOTITorchError (AtenTensorHandle tensor, int64_t** ret_sizes)",
        "aoti_torch_get_strides": (
            "AOTITorchError (AtenTensorHandle tensor, int64_t** ret_strides)"
        ),
        "aoti_torch_get_dtype": "AOTITorchError (AtenTensorHandle tensor, int32_t* ret_dtype)",
        "aoti_torch_delete_tensor_object": "AOTITorchError (AtenTensorHandle tensor)",
    },
    _INTERFACE_H: {
        "AOTInductorModelContainerCreateWithDevice": (
            "AOTIRuntimeError (AOTInductorModelContainerHandle* container_handle, size_t"
            " num_models, const char* device_str, const char* cubin_dir)"
        ),
        "AOTInductorModelContainerGetNumOutputs": (
            "AOTIRuntimeError (AOTInductorModelContainerHandle container_handle, size_t*"
            " ret_num_outputs)"
        ),
        "AOTInductorModelContainerRun": (
            "AOTIRuntimeError (AOTInductorModelContainerHandle container_handle,"
            " AtenTensorHandle* input_handles, size_t num_inputs, AtenTensorHandle*"
            " output_handles, size_t num_outputs, AOTInductorStreamHandle stream_handle,"
            " AOTIProxyExecutorHandle proxy_executor_handle)"
        ),
        "AOTInductorModelContainerDelete": (
            "AOTIRuntimeError (AOTInductorModelContainerHandle container_handle)"
        ),
    },
}


def declared_prototypes(header: Path, names: list[str]) -> dict[str, list[str]]:
    """Each name's declarations in a C header, as `ret (params)` with whitespace collapsed."""
    text = re.sub(r"//[^\n]*", "", header.read_text())
    found: dict[str, list[str]] = {}
    for name in names:
        hits = re.findall(r"\b(\w+)\s+" + name + r"\s*\(([^;]*?)\)\s*;", text)
        found[name] = [f"{ret} ({' '.join(args.split())})" for ret, args in hits]
    return found


def c_runner_problem() -> str | None:
    """Why the ctypes driver must not run with the installed torch (None: it may).

    The canary: every C function it calls is declared in the installed torch's headers exactly
    once and exactly as the ctypes signatures assume. A mismatch would corrupt memory or crash
    the process, never raise, so it is found here, before any library is loaded.
    """
    package = torch_dir()
    if package is None:
        return "torch is not installed"
    for rel, expected in _VERIFIED_PROTOTYPES.items():
        try:
            found = declared_prototypes(package / rel, list(expected))
        except OSError as exc:
            return f"torch's header {rel} cannot be read ({exc})"
        for name, proto in expected.items():
            if found[name] != [proto]:
                return f"{name} is declared {found[name]} in this torch, verified as {proto!r}"
    return None


@functools.lru_cache(maxsize=1)
def c_runner_canary() -> str | None:
    """`c_runner_problem`, checked once per process."""
    return c_runner_problem()


@functools.lru_cache(maxsize=1)
def libtorch() -> Libtorch:
    """Loaded and declared once per process, whatever the number of compiled models."""
    return Libtorch()


class Libtorch:
    """libtorch's C shim for tensors (`aoti_torch/c/shim.h`), loaded with ctypes.

    RTLD_GLOBAL, so the model library's undefined `aoti_torch_*` symbols resolve to it; if
    torch is imported (now or later) the same files are shared, not loaded twice.
    """

    def __init__(self) -> None:
        problem = c_runner_canary()
        if problem is not None:
            raise CompatError(f"the ctypes driver is not verified for this torch: {problem}")
        package = torch_dir()
        assert package is not None  # the canary found its headers
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
                raise CompatError(f"the compiled model returned a non-contiguous {shape} output")
            n = int(np.prod(shape))
            if dtype.value == self.float32:
                flat = np.ctypeslib.as_array(C.cast(data, C.POINTER(C.c_float)), (n,)).copy()
            elif dtype.value == self.bfloat16:
                raw = np.ctypeslib.as_array(C.cast(data, C.POINTER(C.c_uint16)), (n,))
                flat = (raw.astype(np.uint32) << 16).view(np.float32)
            else:
                raise CompatError(f"the compiled model returned dtype code {dtype.value}")
            return flat.reshape(shape)
        finally:
            cpu.aoti_torch_delete_tensor_object(handle)


def _check(code: int, what: str) -> None:
    if code:
        raise CompatError(f"libtorch could not {what} (error {code}; see stderr)")


class CRunner:
    """One AOTInductor model container, driven through its C interface with ctypes.

    Raises CompatError (before loading anything) where `c_runner_canary` finds a problem.
    """

    def __init__(self, package: Path) -> None:
        problem = c_runner_canary()
        if problem is not None:  # before anything is loaded: a wrong signature would crash
            raise CompatError(f"the ctypes driver is not verified for this torch: {problem}")
        self._torch = libtorch()  # first: the model library links against libtorch
        with zipfile.ZipFile(package) as zf:
            libs = [n for n in zf.namelist() if n.endswith(".so") and "/aotinductor/model/" in n]
            if len(libs) != 1:
                raise KeyError(f"{len(libs)} model libraries in the package, expected 1")
            with tempfile.TemporaryDirectory(prefix="multitag-aoti-") as tmp:
                lib = C.CDLL(zf.extract(libs[0], tmp))  # mapped: the file may go
        handle_t = C.c_void_p
        lib.AOTInductorModelContainerCreateWithDevice.argtypes = [
            C.POINTER(handle_t), C.c_size_t, C.c_char_p, C.c_char_p,
        ]  # fmt: skip
        lib.AOTInductorModelContainerGetNumOutputs.argtypes = [
            handle_t, C.POINTER(C.c_size_t),
        ]  # fmt: skip
        lib.AOTInductorModelContainerRun.argtypes = [
            handle_t, C.POINTER(handle_t), C.c_size_t, C.POINTER(handle_t),
            C.c_size_t, handle_t, handle_t,
        ]  # fmt: skip
        lib.AOTInductorModelContainerDelete.argtypes = [handle_t]
        handle, n_out = handle_t(), C.c_size_t()
        if lib.AOTInductorModelContainerCreateWithDevice(C.byref(handle), 1, b"cpu", None):
            raise RuntimeError("the model container could not be created (see stderr)")
        lib.AOTInductorModelContainerGetNumOutputs(handle, C.byref(n_out))
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
            raise CompatError(f"the compiled model failed on a batch of {tuple(x.shape)}")
        return self._torch.to_numpy(outputs[0])

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            self._lib.AOTInductorModelContainerDelete(handle)
