"""Two trees side by side: the shard tasks' img/s and the fixed start of `multitag tag`.

    python -m benchmarks.bench_ab --before REV [--images 3000] [--repeats 2] [--no-record]

Why: a change that only moves code (issue 16's restructure) must not cost speed where users
feel it, on a bucket's worth of photos. Figures from different sessions cannot be compared
(machines differ, and neighbours move a 2-core machine's speed by +-25% over minutes), so both
trees run here, on the same model and photos, alternating (A B B A ...), and the report gives
each run and the after/before ratio of the medians.

- "before" is a git worktree of REV; "after" is this checkout. Both run as real `multitag tag`
  processes of this virtualenv, each with its own tree first on PYTHONPATH.
- Shard tasks' img/s: images tagged by the shard tasks over their time (the manifest's
  `tag_s`; images a head start tagged before the run began are left out of both).
- Fixed start: the wall time of `multitag tag` on a folder of one photo (Prefect's temporary
  server, imports, model load, one shard), the cost every short run pays.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.bench_tagging import SIZES, _head_start_images, _shard_rate
from benchmarks.common import (
    REPO,
    bench_env,
    environment_line,
    make_photos,
    multitag_cli,
    record,
    run_measured,
    table,
)


def worktree(rev: str, where: Path) -> Path:
    """A detached checkout of `rev` at `where` (made anew)."""
    if where.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=REPO, check=False)
        shutil.rmtree(where, ignore_errors=True)
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(where), rev], cwd=REPO, check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return where


def register_with(tree: Path, home: Path, work: Path) -> str:
    """Register and promote the model with the *before* tree's code: both trees then read a
    version in the format the older code writes (the newer one must read it anyway)."""
    code = (
        "import sys; from pathlib import Path; "
        "from benchmarks.bench_tagging import register_trained; "
        "print(register_trained(Path(sys.argv[1]), Path(sys.argv[2]), arch='resnet18', "
        "img_size=224, n_train=96, epochs=1)['version'])"
    )
    env = dict(os.environ) | {"PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", code, str(home), str(work)], env=env,
                         cwd=tree, capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def short_sha(rev: str) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return out.stdout.strip()


def tag_once(tree: Path, root: Path, source: Path, run: str) -> dict[str, Any]:
    """`multitag tag` of `tree` on `source` into a fresh output: wall s and its manifest."""
    out = root / "tags" / run
    shutil.rmtree(out, ignore_errors=True)
    env = bench_env(root) | {"PYTHONPATH": str(tree)}
    cmd = [multitag_cli(), "tag", str(source), "--out", str(out), "--shard-size", "1000"]
    wall, _, _ = run_measured(cmd, env)
    manifest = json.loads(next(out.glob("*/_manifests/*.json")).read_text())
    return {"wall_s": wall, "manifest": manifest}


def alternate(trees: dict[str, Path], repeats: int) -> list[tuple[str, int]]:
    """A B B A A B ...: each tree as often first as second, so a drift in the machine's
    speed over the runs falls on both alike."""
    names = list(trees)
    order: list[tuple[str, int]] = []
    for i in range(repeats):
        pair = names if i % 2 == 0 else names[::-1]
        order += [(name, i) for name in pair]
    return order


def measure_size(trees: dict[str, Path], root: Path, photos: list[Path], repeats: int,
                 label: str) -> dict[str, list[float]]:  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in trees}
    scorers: dict[str, set[str]] = {name: set() for name in trees}
    for name, i in alternate(trees, repeats):
        r = tag_once(trees[name], root, photos[0].parent, f"{label}-{name}-{i}")
        rate = _shard_rate(r["manifest"], "tag_s")
        n = r["manifest"]["tagged"]
        head = _head_start_images(r["manifest"])
        print(f"{label} {name} #{i}: {n} tagged, shard tasks {rate or 0:.1f} img/s, "
              f"head start {head}, wall {r['wall_s']:.1f} s")  # fmt: skip
        scorers[name].update(r["manifest"].get("scorers", []))
        if n != len(photos):
            raise RuntimeError(f"{name} tagged {n} of {len(photos)} photos")
        if rate is not None:
            rates[name].append(rate)
    print(f"{label} scorers: {scorers}")
    return rates


def measure_start(trees: dict[str, Path], root: Path, repeats: int) -> dict[str, list[float]]:
    one = make_photos(root / "one", 1, SIZES["voc"], seed=7)
    walls: dict[str, list[float]] = {name: [] for name in trees}
    for name, i in alternate(trees, repeats):
        r = tag_once(trees[name], root, one[0].parent, f"start-{name}-{i}")
        walls[name].append(r["wall_s"])
        print(f"fixed start {name} #{i}: {r['wall_s']:.2f} s")
    return walls


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the 'before' tree")
    parser.add_argument("--after", help="git revision of the 'after' tree; default: this checkout")
    parser.add_argument("--images", type=int, default=3000, help="photos of each size")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tree per size")
    parser.add_argument("--work", type=Path, default=Path("/tmp/multitag-bench-ab"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    work = args.work
    after = worktree(args.after, work / "after-tree") if args.after else REPO
    trees = {"before": worktree(args.before, work / "before-tree"), "after": after}
    before_sha, after_sha = short_sha(args.before), short_sha(args.after or "HEAD")
    root = work / "root"
    shutil.rmtree(root / "home", ignore_errors=True)
    (root / "home").mkdir(parents=True, exist_ok=True)
    version = register_with(trees["before"], root / "home", work)
    results: dict[str, Any] = {"version": version}
    rows = []
    for size in ("voc", "phone"):
        photos = make_photos(work / f"photos-{size}-{args.images}", args.images, SIZES[size])
        rates = measure_size(trees, root, photos, args.repeats, size)
        b, a = statistics.median(rates["before"]), statistics.median(rates["after"])
        results[size] = {"before": rates["before"], "after": rates["after"], "ratio": a / b}
        rows.append([f"shard tasks, {args.images} {size}-sized (img/s)",
                     " / ".join(f"{r:.1f}" for r in rates["before"]),
                     " / ".join(f"{r:.1f}" for r in rates["after"]), f"{a / b:.3f}"])  # fmt: skip
    walls = measure_start(trees, root, args.repeats + 1)
    b, a = statistics.median(walls["before"]), statistics.median(walls["after"])
    results["start"] = {"before": walls["before"], "after": walls["after"], "ratio": a / b}
    rows.append(["fixed start, 1 photo (wall s)", " / ".join(f"{w:.2f}" for w in walls["before"]),
                 " / ".join(f"{w:.2f}" for w in walls["after"]), f"{a / b:.3f}"])  # fmt: skip
    block = (
        f"`python -m benchmarks.bench_ab --before {args.before} --images {args.images}` "
        f"({environment_line()}); before = `{before_sha}`, after = `{after_sha}`; resnet18 "
        f"(random init, fast path as registered), runs alternating.\n\n"
        + table(["measure", "before (each run)", "after (each run)", "after / before"], rows)
    )
    print(block)
    if not args.no_record:
        record("## Before/after, side by side (bench_ab)", block)
    return results


if __name__ == "__main__":
    main()
