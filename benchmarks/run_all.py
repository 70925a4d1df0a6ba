"""Every benchmark in turn (`make bench`); each appends its figures to benchmarks/RESULTS.md.

    python -m benchmarks.run_all [--quick] [--only tagging,memory,overhead,thresholds]

Full: about 27-32 minutes on 2 shared cores (the fastai baselines are the slow part);
--quick: fewer images per run (still medians of 3 after a warm-up), about 18 minutes. The
overhead benchmark runs its realistic case (`--voc --server`: 2,000 VOC-sized photos,
resnet18, temporary and running Prefect server); its other cases are flags of its own.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

BENCHES = ("tagging", "memory", "overhead", "thresholds")


def _runner(name: str) -> Callable[[list[str]], object]:
    """Import lazily: each benchmark pulls in torch/fastai/prefect only when it runs."""
    if name == "tagging":
        from benchmarks.bench_tagging import main
    elif name == "memory":
        from benchmarks.bench_memory import main
    elif name == "overhead":
        from benchmarks.bench_overhead import main
    elif name == "thresholds":
        from benchmarks.bench_thresholds import main
    else:
        raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}")
    return main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(BENCHES))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for name in args.only.split(","):
        extra = ["--no-record"] if args.no_record else []
        if args.quick and name != "thresholds":
            extra.append("--quick")
        if name == "overhead":  # the run the target is about: real photos, against both servers
            extra += ["--voc", "--server"]
        t0 = time.perf_counter()
        print(f"== {name} ==", flush=True)
        _runner(name)(extra)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s ==", flush=True)


if __name__ == "__main__":
    main()
