"""Canaries for multitag._compat.torch: each private torch internal is used only as verified.

These fail on a torch other than the verified one (tests/unit: pinned torch==2.14.1); on an
upgrade, re-verify each use (and its measured reason in multitag/_compat/torch.py), then add
the version to VERIFIED_TORCH.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from multitag._compat import torch as torch_compat
from multitag.inference import cpu


def test_the_installed_torch_is_a_verified_one() -> None:
    assert torch_compat.installed_torch() in torch_compat.VERIFIED_TORCH


def test_the_c_interface_is_declared_as_the_ctypes_signatures_assume() -> None:
    assert torch_compat.c_runner_problem() is None


def test_a_changed_c_prototype_is_caught_before_any_library_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = torch_compat.torch_dir()
    assert real is not None
    for rel in (torch_compat._SHIM_H, torch_compat._INTERFACE_H):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real / rel, tmp_path / rel)
    shim = tmp_path / torch_compat._SHIM_H
    text = shim.read_text()
    decl = "aoti_torch_create_tensor_from_blob(\n    void* data,"
    changed = text.replace(decl, decl + "\n    int32_t layout,", 1)
    assert changed != text
    shim.write_text(changed)
    monkeypatch.setattr(torch_compat, "torch_dir", lambda: tmp_path)
    problem = torch_compat.c_runner_problem()
    assert problem is not None and "aoti_torch_create_tensor_from_blob" in problem
    monkeypatch.setattr(torch_compat, "c_runner_canary", lambda: problem)
    with pytest.raises(torch_compat.CompatError, match="not verified"):
        torch_compat.CRunner(tmp_path / "never-opened.pt2")  # raises, never crashes


def test_version_py_gives_torch_version_with_its_local_part() -> None:
    import torch

    assert torch_compat.torch_version_from_file() == torch.__version__
    assert cpu.torch_version() == torch.__version__


def test_inductor_vector_isa_flags_are_gcc_options_this_cpu_has() -> None:
    flags = torch_compat.vec_isa_build_flags()
    assert flags.split() and all(o.startswith("-m") for o in flags.split())
    here = cpu.cpu_flags()
    if here is not None:  # Linux: inductor builds only for what this CPU runs
        assert set(cpu.isa_flags(flags)) <= here
