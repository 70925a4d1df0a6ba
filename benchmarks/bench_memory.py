"""Peak RSS of tagging 2,000 vs 20,000 images: memory must stay flat as the count grows.

    python -m benchmarks.bench_memory [--quick] [--no-record]

Each count is tagged by a fresh subprocess, both as the user runs it (`multitag tag`) and as
Python code calls it (`flows.tag.tag_images`, the same flow: there is one shard runner, with
Prefect's own temporary server instead of the CLI's early one); the peak RSS is the child's
ru_maxrss, taken from a small launcher (benchmarks/peak_rss.py: a child of this process
would report this process's own high-water mark, ~1.2 GB after training the model).
A small model (shapes_cnn, 32 px) and small JPEGs keep the run short: what could grow with
the count (the listing, the claim log, rows, shard bookkeeping, Prefect task runs) does not
depend on the model or image size. The model is registered with its export-time fast path,
as `multitag retrain` does; a warm-up run fills the page cache.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from benchmarks.bench_tagging import register_trained
from benchmarks.common import (
    bench_env,
    environment_line,
    make_photos,
    multitag_cli,
    python,
    record,
    run_measured,
    table,
)

SECTION = "## Memory: peak RSS vs image count"
LIBRARY = "tag_images from Python"
LIBRARY_RUN = (
    "import sys; from multitag.runtime import configure_cpu_runtime; configure_cpu_runtime(); "
    "from flows.tag import tag_images; "
    "s = tag_images(source=sys.argv[1], out=sys.argv[2]); "
    "print(s['tagged'], s['failed'])"
)


def tag_cli(root: Path, source: Path, out: Path, api_url: str | None = None) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [multitag_cli(), "tag", str(source), "--out", str(out)]
    env = bench_env(root)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    wall, rss, _ = run_measured(cmd, env)
    return wall, rss


def tag_library(root: Path, source: Path, out: Path) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    wall, rss, _ = run_measured([python(), "-c", LIBRARY_RUN, str(source), str(out)],
                                bench_env(root))  # fmt: skip
    return wall, rss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 vs 10,000 images")
    parser.add_argument("--work", type=Path, default=Path("/tmp/multitag-bench"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    small, big = (1000, 10_000) if args.quick else (2000, 20_000)
    env_line = environment_line()
    root = args.work / "memory"
    shutil.rmtree(root / "home", ignore_errors=True)
    shutil.rmtree(root / "cache", ignore_errors=True)
    register_trained(root / "home", root, arch="shapes_cnn", img_size=32, n_train=96, epochs=1)
    photos = make_photos(args.work / "photos" / "small-80x60", big, (80, 60))
    folders = {}
    for n in (small, big):  # hard links: same files, one folder per count
        folder = args.work / "photos" / f"small-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        for p in photos[:n]:
            if not (folder / p.name).exists():
                (folder / p.name).hardlink_to(p)
        folders[n] = folder
    tag_library(root, folders[small], root / "out" / "warm")  # page cache
    rows, rss = [], {}
    for how, fn in (("multitag tag", tag_cli), (LIBRARY, tag_library)):
        for n in (small, big):
            wall, peak = fn(root, folders[n], root / "out" / f"{how[:3]}-{n}")
            rss[(how, n)] = peak
            rows.append([how, f"{n:,}", peak, f"{wall:.1f}", f"{n / wall:.0f}"])
    growth = {h: rss[(h, big)] / rss[(h, small)] - 1 for h in ("multitag tag", LIBRARY)}
    verdict = ", ".join(
        f"{h}: {g:+.1%} ({'met' if g <= 0.15 else 'NOT met'})" for h, g in growth.items()
    )
    block = "\n".join([
        f"### {'Quick' if args.quick else 'Full'} run: {env_line}", "",
        table(["path", "images", "peak RSS MiB", "wall s", "img/s"], rows), "",
        f"Peak RSS growth {small:,} -> {big:,} images (target <= +15%): {verdict}. "
        "shapes_cnn 32 px, 80x60 JPEGs, precision auto, shard size 1000, one subprocess "
        "per row (ru_maxrss via benchmarks/peak_rss.py).",
    ])  # fmt: skip
    print(block)
    if not args.no_record:
        record(SECTION, block)


if __name__ == "__main__":
    main()
