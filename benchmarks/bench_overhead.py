"""Start-up overhead: `multitag tag` vs the same tag flow called from Python.

    python -m benchmarks.bench_overhead [--quick] [--no-record] [--server]
                                        [--voc [--arch resnet50] [--phone]]

Both run the one shard runner, the tag flow (`flows.tag.tag_images`), on the same 2,000 small
JPEGs with the same model in a fresh subprocess: `multitag tag` starts Prefect's temporary
server early and tags a head start while it boots; the Python call lets Prefect start its
own. (Until issue 15 the second path was a separate in-process runner, `tagging.tag_source`,
and this compared Prefect against no Prefect; tests and benchmarks now measure only what
production runs.) Runs alternate (CLI, Python, CLI, ...) so a neighbour's load hits both
alike; medians of 3 after a warm-up of each.

`--voc` tags VOC-sized photos with resnet18 at 224 px instead: a run of realistic length.
Prefect's cost is fixed, so its share depends on how long the tagging takes: `--arch
resnet50` (a slower model) and `--phone` (2000x1500 photos, slower to decode) measure it on
the other cases of the throughput benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from benchmarks.bench_memory import LIBRARY, tag_cli, tag_library
from benchmarks.bench_tagging import register_trained
from benchmarks.common import bench_env, environment_line, make_photos, record, table

SECTION = "## Start-up overhead: `multitag tag` vs the tag flow from Python"


@contextlib.contextmanager
def prefect_server(root: Path, port: int = 4299) -> Iterator[tuple[str, int]]:
    """A `prefect server start` in the background (how a deployment runs); yields its API URL
    and process id.

    With PREFECT_API_URL set, `multitag tag` talks to it instead of starting an ephemeral
    server of its own in every process.
    """
    from benchmarks.common import python

    env = bench_env(root)
    url = f"http://127.0.0.1:{port}/api"
    cmd = [python(), "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
           str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("prefect server did not become healthy") from None
                time.sleep(1)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


SERVED = "multitag tag (running server)"
BESIDE = "tag_images from Python (beside the idle server)"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its waited-for children) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _served_note(med: dict[str, float], server_cpu: dict[str, list[float]]) -> str:
    served, beside, alone = med[SERVED], med[BESIDE], med[LIBRARY]
    cpu = {k: statistics.median(v) for k, v in server_cpu.items()}
    return (
        f" Against a running Prefect server (PREFECT_API_URL, as deployments run), on the same "
        f"2 cores: **{(served - beside) / served:.1%}** overhead against the Python call beside "
        f"the idle server ({(served - alone) / served:.1%} against the Python call with no "
        f"server). The server used {cpu[SERVED]:.1f} CPU-s during a flow run and "
        f"{cpu[BESIDE]:.1f} CPU-s during a Python call (its own services, idle for us)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="same 2,000 images, 3 runs")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/multitag-bench"))
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--server", action="store_true", help="also against a running server")
    parser.add_argument(
        "--voc",
        action="store_true",
        help="VOC-sized photos (500x375) and resnet18 at 224 px instead of 80x60 JPEGs and a "
        "32 px shapes_cnn: a tagging run of realistic length",
    )
    parser.add_argument("--arch", choices=("resnet18", "resnet50"), default="resnet18",
                        help="the model of a --voc run")  # fmt: skip
    parser.add_argument("--phone", action="store_true",
                        help="with --voc: phone-sized photos (2000x1500) instead")  # fmt: skip
    args = parser.parse_args(argv)
    if (args.phone or args.arch != "resnet18") and not args.voc:
        parser.error("--arch and --phone choose the model and photos of a --voc run")
    env_line = environment_line()
    size = "phone" if args.phone else "voc"
    case = f"{size}{'' if args.arch == 'resnet18' else '-' + args.arch}"
    root = args.work / (f"overhead-{case}" if args.voc else "overhead")
    shutil.rmtree(root / "home", ignore_errors=True)
    shutil.rmtree(root / "cache", ignore_errors=True)
    if args.voc:
        register_trained(root / "home", root, arch=args.arch, img_size=224, n_train=64,
                         n_valid=256, epochs=1)  # fmt: skip
        wh = (2000, 1500) if args.phone else (500, 375)
        photos = make_photos(args.work / "photos" / f"{size}-{wh[0]}x{wh[1]}", args.images, wh)
        what = f"{'Phone' if args.phone else 'VOC'}-sized photos, {args.arch} 224 px"
    else:
        register_trained(root / "home", root, arch="shapes_cnn", img_size=32, n_train=96,
                         epochs=1)  # fmt: skip
        photos = make_photos(args.work / "photos" / "small-80x60", args.images, (80, 60))
        what = "80x60 JPEGs, shapes_cnn 32 px"
    folder = args.work / "photos" / f"overhead-{size + '-' if args.voc else ''}{args.images}"
    folder.mkdir(parents=True, exist_ok=True)
    for p in photos[: args.images]:
        if not (folder / p.name).exists():
            (folder / p.name).hardlink_to(p)
    tag_library(root, folder, root / "out" / "warm-lib")  # also builds the fast-path cache
    tag_cli(root, folder, root / "out" / "warm-cli")  # Prefect's first start migrates its DB
    walls: dict[str, list[float]] = {"multitag tag": [], LIBRARY: []}
    for i in range(args.repeats):
        walls["multitag tag"].append(tag_cli(root, folder, root / "out" / f"cli-{i}")[0])
        walls[LIBRARY].append(tag_library(root, folder, root / "out" / f"lib-{i}")[0])
    server_cpu: dict[str, list[float]] = {SERVED: [], BESIDE: []}
    if args.server:
        # The library runs again beside the idle server: its services (scheduler, event
        # persister, ...) use CPU on these same 2 cores whether a flow runs or not.
        with prefect_server(root) as (url, pid):
            walls[SERVED], walls[BESIDE] = [], []
            tag_cli(root, folder, root / "out" / "warm-srv", api_url=url)
            for i in range(args.repeats):
                cpu0 = _cpu_seconds(pid)
                walls[SERVED].append(tag_cli(root, folder, root / "out" / f"srv-{i}", url)[0])
                cpu1 = _cpu_seconds(pid)
                walls[BESIDE].append(tag_library(root, folder, root / "out" / f"lib-{i}")[0])
                server_cpu[SERVED].append(cpu1 - cpu0)
                server_cpu[BESIDE].append(_cpu_seconds(pid) - cpu1)
    med = {k: statistics.median(v) for k, v in walls.items()}
    overhead = med["multitag tag"] - med[LIBRARY]
    share = overhead / med["multitag tag"]
    rows = [[k, f"{med[k]:.1f}", ", ".join(f"{w:.1f}" for w in v), f"{args.images / med[k]:.0f}"]
            for k, v in walls.items()]  # fmt: skip
    block = "\n".join([
        f"### {what}: {env_line}", "",
        table(["path", "median wall s", "runs", "img/s"], rows), "",
        f"`multitag tag` minus the same flow called from Python on {args.images:,} images: "
        f"{overhead:+.1f} s = **{share:+.1%}** of the `multitag tag` run (negative: the CLI's "
        "early server and head start win back Prefect's start). "
        + ("" if args.voc else "Small model and images make the tagging itself short, so "
           "start-up weighs most here. ")
        + "Both pay the same per-shard task cost (~1 task per 1,000-image shard)."
        + (_served_note(med, server_cpu) if SERVED in med else ""),
    ])  # fmt: skip
    print(block)
    if not args.no_record:
        record(SECTION, block)


if __name__ == "__main__":
    main()
