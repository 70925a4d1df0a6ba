"""Time threshold selection on 1,000,000 images x 20 labels (issue 3: "selects in seconds").

    python -m benchmarks.bench_thresholds [--images N] [--labels L] [--repeats R] [--no-record]

Scores are synthetic float32 sigmoids (what fastai returns) with label-specific prevalence
and separability, so every label has ~N distinct scores: the worst case for an exact sweep.
Each configuration runs once to warm up, then `repeats` times; the median is reported and a
row is added to benchmarks/RESULTS.md under "## Threshold selection".
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import cpu_model
from multitag.config import ThresholdParams
from multitag.training.thresholds import evaluate, select_thresholds

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Threshold selection"
TABLE_HEAD = (
    "Seconds, median of 3 after a warm-up: wall (CPU time of this process). The machine is\n"
    "shared: `load` is the 1-minute load average when the run ended; wall time inflates with\n"
    "it, CPU time much less.\n\n"
    "| date | images x labels | select: global | select: per_label | select: shrunk (default) "
    "| evaluate | CPU | cores | load | numpy |\n"
    "|---|---|---|---|---|---|---|---|---|---|\n"
)


def synthetic_scores(n: int, n_labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random((n, n_labels), dtype=np.float32) < rng.uniform(0.02, 0.4, n_labels)
    signal = rng.uniform(1.0, 4.0, n_labels).astype(np.float32)
    z = rng.standard_normal((n, n_labels), dtype=np.float32) + y * signal - 1.0
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32), y


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds: on a shared machine wall time measures the neighbours too."""
    fn()  # warm-up: page faults, allocator, lazy imports
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def record(row: str) -> None:
    """Add `row` at the end of our section, creating file/section if absent (others' kept)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n" + TABLE_HEAD + row + "\n"
    else:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        end = len(text) if nxt == -1 else nxt + 1
        section = text[start:end].rstrip("\n") + "\n" + row + "\n"
        text = text[:start] + section + ("\n" + text[end:] if nxt != -1 else "")
    RESULTS.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="Print only.")
    args = parser.parse_args(argv)

    probs, targets = synthetic_scores(args.images, args.labels)
    vocab = [f"label{i}" for i in range(args.labels)]
    timings: dict[str, tuple[float, float]] = {}
    for policy in ("global", "per_label", "shrunk"):
        params = ThresholdParams(policy=policy)
        timings[policy] = median_seconds(
            lambda params=params: select_thresholds(probs, targets, vocab, params), args.repeats
        )
    ts = select_thresholds(probs, targets, vocab)
    timings["evaluate"] = median_seconds(lambda: evaluate(probs, targets, ts, vocab), args.repeats)

    shape = f"{args.images:,} x {args.labels}"
    print(f"select_thresholds / evaluate on {shape} float32 scores, median of {args.repeats}")
    print(f"{'step':<22}{'wall s':>10}{'cpu s':>10}")
    for name, (wall, cpu) in timings.items():
        label = f"select ({name})" if name != "evaluate" else "evaluate"
        print(f"{label:<22}{wall:>10.2f}{cpu:>10.2f}")
    cells = " | ".join(f"{w:.2f} ({c:.2f})" for w, c in timings.values())
    row = (
        f"| {dt.date.today().isoformat()} | {shape} | {cells} | {cpu_model()} "
        f"| {os.cpu_count()} | {os.getloadavg()[0]:.1f} | {np.__version__} |"
    )
    if not args.no_record:
        record(row)
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
