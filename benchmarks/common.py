"""Shared pieces of the tagging benchmarks: environment line, medians, fixtures, RESULTS.md.

Why shared: every benchmark must report the same machine facts (CPU, cores, load, library
versions, date) and take medians the same way, or their figures cannot be compared.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The instruction sets that decide which fast path wins (bf16/AMX, VNNI)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    wanted = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(f for f in wanted if f" {f}" in flags) or "none of avx512/vnni/bf16/amx"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "fastai", "onnxruntime", "pillow", "prefect", "numpy"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} -")
    return ", ".join(out)


def environment_line() -> str:
    load = os.getloadavg()
    return (
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; {cpu_model()} "
        f"({cpu_flags()}); {os.cpu_count()} cores (shared); load avg {load[0]:.1f}/{load[1]:.1f}"
        f"; {versions()}"
    )


def median_rate(fn: Callable[[], int], repeats: int, warmup: bool = True) -> tuple[float, list]:
    """Median items/s of `fn` (which returns how many items it processed) and every rate."""
    if warmup:
        fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def bench_env(root: Path) -> dict[str, str]:
    """Environment of benchmark subprocesses: own home/caches, quiet, PASSIVE OpenMP."""
    env = dict(os.environ)
    env.update(
        {
            "MULTITAG_HOME": str(root / "home"),
            "MULTITAG_CACHE_DIR": str(root / "cache"),
            "PREFECT_HOME": str(root / "prefect"),
            "OMP_WAIT_POLICY": "PASSIVE",
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "PYTHONPATH": str(REPO),
        }
    )
    env.pop("PREFECT_API_URL", None)
    return env


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in MiB of `cmd` alone (see benchmarks/peak_rss.py) and output.

    The wall time is taken by the launcher around the command itself, so the launcher's own
    start (~50 ms) is not counted.
    """
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        stats_path = f.name
    try:
        launcher = [sys.executable, "-m", "benchmarks.peak_rss", stats_path, *cmd]
        proc = subprocess.run(launcher, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = proc.stdout.decode()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
        stats = json.loads(Path(stats_path).read_text())
    finally:
        Path(stats_path).unlink(missing_ok=True)
    return stats["wall_s"], int(stats["max_rss_kib"] // 1024), out


def python() -> str:
    return sys.executable


def multitag_cli() -> str:
    return str(Path(sys.executable).with_name("multitag"))


def record(section: str, block: str, intro: str = "") -> None:
    """Append `block` at the end of `section` of RESULTS.md (created with `intro` if absent)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if f"\n{section}\n" not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n\n" + (intro + "\n\n" if intro else "")
        text += block.rstrip("\n") + "\n"
    else:
        start = text.index(f"\n{section}\n") + 1
        nxt = text.find("\n## ", start + len(section))
        end = len(text) if nxt == -1 else nxt + 1
        body = text[start:end].rstrip("\n") + "\n\n" + block.rstrip("\n") + "\n"
        text = text[:start] + body + ("\n" + text[end:] if nxt != -1 else "")
    RESULTS.write_text(text)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (also what is printed)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ================================================================================ images


def make_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """n JPEG "photos" of `size`: upscaled shapes scenes plus noise (so JPEG stays photo-like).

    Reused if already there (the generation of phone-sized files is the slow part).
    """
    from PIL import Image

    from multitag.data.shapes import render_scene, scene_for

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"photo_{i:06d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        base = render_scene(scene_for(seed, "test", 10_000 + i, 128), 128).convert("RGB")
        img = np.asarray(base.resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
        noise = rng.integers(-12, 13, (size[1], size[0], 1), dtype=np.int16)
        arr = np.clip(img + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path, "JPEG", quality=88)
    return paths
