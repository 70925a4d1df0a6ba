"""The reliability soak (issue 15, item 13): tag thousands of images through real faults.

`make soak` (or `python -m benchmarks.soak --images N`) does, with real processes and sockets:

1. moto's S3 server on 127.0.0.1 with N small JPEGs (64x64), and a tiny registered model;
2. a fault-free `multitag tag s3://... --out s3://...` of them through the fault proxy
   (tests/s3_faults.py) with no rule: the reference wall time;
3. the same images to another output with >= 5% of requests failing transiently (503
   SlowDown, 500 InternalError, connection resets): one run killed with SIGKILL mid-way, then
   two runs at once during which every request gets `403 ExpiredToken` for a window (a token
   that expires and is renewed), then a final rerun;
4. the output read back with pyarrow and, independently, with DuckDB: images lost,
   duplicated, error rows (every image is a valid JPEG, so any error row is fault-induced);
5. a local-disk run over a folder with odd files mixed in (FIFO, symlink loop, symlink to
   /dev/zero, non-UTF-8 name, `a::b.jpg`, `#`, `?`, spaces, unicode, an .mpo, a file over
   the byte cap): it must finish, and each odd file becomes exactly one row (tagged or
   error), or, for the non-UTF-8 name that cannot be an `image_uri`, is counted as skipped.

It is a measurement tool: it prints every figure, appends them to benchmarks/RESULTS.md with
`--append-results`, and exits non-zero when anything was lost, duplicated or turned into an
error row, when the final rerun failed, or when the local run hung or mis-counted an odd file.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from benchmarks.common import REPO, RESULTS, bench_env, environment_line, multitag_cli, table
from tests.local_servers import moto_server

BUCKET = "soak"
SOURCE_PREFIX = "photos"
IMG_SIZE = 64


# ================================================================================ processes


@dataclass
class RunRecord:
    """One `multitag tag` process: how it ended and how long it took."""

    label: str
    returncode: int | None  # None: killed by the soak on purpose
    wall_s: float
    killed: bool = False
    timed_out: bool = False
    log: str = ""

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.log.splitlines()[-n:])


def status(r: RunRecord) -> str:
    ended = "kill -9" if r.killed else f"exit {r.returncode}"
    return f"{ended}{' TIMED OUT' if r.timed_out else ''}, {r.wall_s:.1f} s"


def start_tag(label: str, source: str, out: str, env: dict[str, str], args: list[str]) -> Any:
    """Start `multitag tag SOURCE --out OUT` in its own process group (so kill -9 hits all)."""
    cmd = [multitag_cli(), "tag", source, "--out", out, *args]
    # Closed in finish(): the file outlives this call because the process writes to it.
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115
        "w+", prefix=f"soak-{label}-", suffix=".log", delete=False
    )
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    proc.soak = (label, log, time.monotonic())  # type: ignore[attr-defined]
    return proc


def finish(proc: Any, timeout_s: float, *, kill: bool = False) -> RunRecord:
    """Wait for (or, with `kill`, SIGKILL) a run; a run over `timeout_s` is killed and flagged."""
    label, log, t0 = proc.soak
    timed_out = False
    if kill:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        try:
            proc.wait(timeout=max(0.0, timeout_s - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.monotonic() - t0
    log.flush()
    log.seek(0)
    text = log.read()
    log.close()
    Path(log.name).unlink(missing_ok=True)
    rc = None if kill else proc.returncode
    record = RunRecord(label, rc, wall, killed=kill, timed_out=timed_out, log=text)
    if rc not in (0, None) or timed_out:  # say why now: a soak is long to rerun
        print(f"--- run {label} ({status(record)}), last lines ---\n{record.tail()}", flush=True)
    return record


def run_tag(
    label: str, source: str, out: str, env: dict[str, str], args: list[str], timeout_s: float
) -> RunRecord:
    return finish(start_tag(label, source, out, env, args), timeout_s)


# ================================================================================ S3 side


def s3_env() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "soak",
        "AWS_SECRET_ACCESS_KEY": "soak",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def direct_fs(endpoint: str) -> Any:
    """s3fs straight to moto (no proxy, no faults): how the soak sets up and reads back."""
    import s3fs

    return s3fs.S3FileSystem(
        key="soak",
        secret="soak",
        client_kwargs={"endpoint_url": endpoint},
        skip_instance_cache=True,
    )


def small_jpegs(n: int, seed: int) -> list[bytes]:
    from tests.tagging_helpers import shape_images

    return shape_images(n, seed=seed, size=IMG_SIZE)


def upload(fs: Any, n: int, seed: int) -> list[str]:
    """N images under s3://soak/photos/ (a third in a sub-folder), their URIs sorted."""
    uris = []
    batch: dict[str, bytes] = {}
    for i, data in enumerate(small_jpegs(n, seed)):
        key = f"{BUCKET}/{SOURCE_PREFIX}/{'sub/' if i % 3 == 0 else ''}img_{i:05d}.jpg"
        batch[key] = data
        uris.append(f"s3://{key}")
        if len(batch) == 500:
            fs.pipe(batch)
            batch = {}
    if batch:
        fs.pipe(batch)
    return sorted(uris)


def part_files(fs: Any, out_prefix: str) -> list[str]:
    """Finished shards under an output prefix (any model partition), fresh from the store."""
    fs.invalidate_cache()
    return sorted(
        p
        for p in fs.find(out_prefix)
        if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet")
    )


# ================================================================================ counting


@dataclass
class Count:
    """What an output holds, as one reader saw it."""

    reader: str
    rows: int
    distinct_images: int
    error_rows: int
    lost: int
    duplicated: int
    unexpected: int
    errors_by_message: dict[str, int] = field(default_factory=dict)


def count_rows(reader: str, uris: list[str], errors: list[str | None], expected: set[str]) -> Count:
    present = set(uris)
    messages = collections.Counter((e or "")[:90] for e in errors if e is not None)
    return Count(
        reader=reader,
        rows=len(uris),
        distinct_images=len(present),
        error_rows=sum(e is not None for e in errors),
        lost=len(expected - present),
        duplicated=len(uris) - len(present),
        unexpected=len(present - expected),
        errors_by_message=dict(messages.most_common(8)),
    )


def count_with_pyarrow(fs: Any, parts: list[str], expected: set[str]) -> Count:
    import pyarrow.dataset as pads

    if not parts:
        return count_rows("pyarrow", [], [], expected)
    t = pads.dataset(parts, filesystem=fs, format="parquet").to_table(
        columns=["image_uri", "error"]
    )
    return count_rows(
        "pyarrow", t.column("image_uri").to_pylist(), t.column("error").to_pylist(), expected
    )


def count_with_duckdb(files: list[Path], expected: set[str]) -> Count:
    """DuckDB reads the same shards (downloaded as they are) on its own Parquet reader."""
    import duckdb

    if not files:
        return count_rows("duckdb", [], [], expected)
    con = duckdb.connect()
    rows = con.execute(
        "SELECT image_uri, error FROM read_parquet(?)", [[str(f) for f in files]]
    ).fetchall()
    con.close()
    return count_rows("duckdb", [r[0] for r in rows], [r[1] for r in rows], expected)


def count_output(fs: Any, out_prefix: str, expected: set[str], scratch: Path) -> list[Count]:
    parts = part_files(fs, out_prefix)
    local = scratch / out_prefix.replace("/", "_")
    local.mkdir(parents=True, exist_ok=True)
    files = []
    for i, p in enumerate(parts):
        dest = local / f"{i:06d}.parquet"
        fs.get_file(p, str(dest))
        files.append(dest)
    return [count_with_pyarrow(fs, parts, expected), count_with_duckdb(files, expected)]


# ================================================================================ the S3 soak


@dataclass
class S3Soak:
    images: int
    shards: int
    fault_rate: float
    token_window_s: float
    clean: RunRecord | None = None
    runs: list[RunRecord] = field(default_factory=list)
    killed_after_parts: int = 0
    requests_faulty: int = 0
    requests_clean: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    token_window_faults: int = 0
    clean_counts: list[Count] = field(default_factory=list)
    counts: list[Count] = field(default_factory=list)
    faulty_wall_s: float = 0.0

    @property
    def fault_fraction(self) -> float:
        return sum(self.faults.values()) / max(1, self.requests_faulty)

    def problems(self) -> list[str]:
        out = []
        if self.clean is None or self.clean.returncode != 0:
            out.append("the fault-free reference run failed: fix that first")
        for c in self.clean_counts:
            if c.lost or c.duplicated or c.error_rows:
                out.append(f"fault-free output ({c.reader}): lost {c.lost}, dup {c.duplicated}")
        for c in self.counts:
            if c.lost or c.duplicated or c.error_rows or c.unexpected:
                out.append(
                    f"{c.reader}: lost {c.lost}, duplicated {c.duplicated}, "
                    f"error rows {c.error_rows}, unexpected {c.unexpected}"
                )
        final = self.runs[-1] if self.runs else None
        if final is None or final.returncode != 0:
            out.append(f"final rerun did not succeed (exit {final and final.returncode})")
        if self.killed_after_parts == 0:
            out.append("the kill -9 came before any shard was written (nothing to survive)")
        if self.fault_fraction < 0.05:
            out.append(f"only {self.fault_fraction:.1%} of requests were faulted (< 5%)")
        return out


def wait_for_parts(fs: Any, out_prefix: str, at_least: int, proc: Any, timeout_s: float) -> int:
    """Poll the store until `at_least` shards exist, the run ends, or time runs out."""
    deadline = time.monotonic() + timeout_s
    n = len(part_files(fs, out_prefix))
    while n < at_least and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        n = len(part_files(fs, out_prefix))
    return n


def s3_soak(args: argparse.Namespace, tiny_home: Path, version: str, scratch: Path) -> S3Soak:
    from tests.s3_faults import FaultProxy, combine, expired_token, transient_mix

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log: one line a request
    servers = contextlib.ExitStack()
    moto = servers.enter_context(moto_server())
    try:
        fs = direct_fs(moto)
        fs.mkdir(BUCKET)
        t0 = time.monotonic()
        uris = upload(fs, args.images, seed=args.seed)
        print(
            f"uploaded {len(uris)} images ({IMG_SIZE} px) in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
        expected = set(uris)
        source = f"s3://{BUCKET}/{SOURCE_PREFIX}"
        tag_args = ["--shard-size", str(args.shard_size), "--model", version]
        report = S3Soak(
            images=len(uris),
            shards=math.ceil(len(uris) / args.shard_size),
            fault_rate=args.fault_rate,
            token_window_s=args.token_window,
        )
        with FaultProxy(moto, seed=args.seed) as proxy:

            def env(label: str) -> dict[str, str]:
                (scratch / f"run-{label}" / "prefect").mkdir(parents=True, exist_ok=True)
                e = bench_env(scratch / f"run-{label}")
                e.update(s3_env())
                e.update({"MULTITAG_HOME": str(tiny_home), "AWS_ENDPOINT_URL": proxy.endpoint})
                return e

            # Reference: the same images, same path (through the proxy), no faults.
            report.clean = run_tag(
                "clean", source, f"s3://{BUCKET}/clean", env("clean"), tag_args, args.run_timeout
            )
            report.requests_clean = proxy.requests
            print(
                f"fault-free run: exit {report.clean.returncode}, {report.clean.wall_s:.1f} s",
                flush=True,
            )
            report.clean_counts = count_output(fs, f"{BUCKET}/clean", expected, scratch)

            out = f"s3://{BUCKET}/faulty"
            out_prefix = f"{BUCKET}/faulty"
            proxy.reset_counts()
            transient = transient_mix(args.fault_rate, seed=args.seed)
            proxy.set_rule(transient)
            phase_t0 = time.monotonic()

            # 1. A run killed with SIGKILL once a fifth of the shards are written.
            a = start_tag("killed", source, out, env("killed"), tag_args)
            target = max(1, report.shards // 5)
            report.killed_after_parts = wait_for_parts(fs, out_prefix, target, a, args.run_timeout)
            if a.poll() is None:
                report.runs.append(finish(a, args.run_timeout, kill=True))
            else:
                report.runs.append(finish(a, args.run_timeout))
                print("WARNING: the run to kill ended by itself before the kill", flush=True)
            print(
                f"kill -9 after {report.killed_after_parts} of {report.shards} shards", flush=True
            )

            # 2. Two runs at once; mid-way, every request gets 403 ExpiredToken for a window.
            b = start_tag("concurrent-1", source, out, env("concurrent-1"), tag_args)
            c = start_tag("concurrent-2", source, out, env("concurrent-2"), tag_args)
            before = len(part_files(fs, out_prefix))
            wait_for_parts(fs, out_prefix, before + 1, b, args.run_timeout)
            counts_before = proxy.counts["403 ExpiredToken"]
            proxy.set_rule(combine(expired_token(), transient))
            # At least `token_window` seconds, and until 10 requests met it (runs between
            # requests, e.g. decoding, would otherwise let a short window pass unseen).
            window_t0 = time.monotonic()
            window_end = window_t0 + args.token_window
            while time.monotonic() < window_end or (
                proxy.counts["403 ExpiredToken"] - counts_before < 10
                and time.monotonic() < window_end + 60
                and (b.poll() is None or c.poll() is None)
            ):
                time.sleep(0.2)
            proxy.set_rule(transient)
            report.token_window_s = time.monotonic() - window_t0
            report.token_window_faults = proxy.counts["403 ExpiredToken"] - counts_before
            print(
                f"ExpiredToken window of {report.token_window_s:.0f} s: "
                f"{report.token_window_faults} requests refused",
                flush=True,
            )
            report.runs.append(finish(b, args.run_timeout))
            report.runs.append(finish(c, args.run_timeout))

            # 3. The final rerun, still under transient faults.
            report.runs.append(
                run_tag("final", source, out, env("final"), tag_args, args.run_timeout)
            )
            report.faulty_wall_s = time.monotonic() - phase_t0
            report.requests_faulty = proxy.requests
            report.faults = dict(proxy.counts)
            proxy.set_rule(None)
        for r in report.runs:
            print(f"run {r.label}: {status(r)}", flush=True)
        report.counts = count_output(fs, out_prefix, expected, scratch)
        return report
    finally:
        servers.close()


# ================================================================================ local disk


@dataclass
class OddFile:
    name: str
    kind: str
    rows: int = 0
    tagged: int = 0
    errors: list[str] = field(default_factory=list)
    skipped_in_manifest: bool = False

    @property
    def ok(self) -> bool:
        if self.kind == "non-UTF-8 name":
            return self.rows == 1 or (self.rows == 0 and self.skipped_in_manifest)
        return self.rows == 1


@dataclass
class LocalSoak:
    good: int
    run: RunRecord | None = None
    good_rows: int = 0
    good_lost: int = 0
    good_duplicated: int = 0
    good_error_rows: int = 0
    odd: list[OddFile] = field(default_factory=list)
    duckdb_rows: int = 0
    pyarrow_rows: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.run is None or self.run.timed_out:
            out.append("the local run did not finish in time (hung)")
        elif self.run.returncode != 0:
            out.append(f"the local run failed (exit {self.run.returncode})")
        if self.good_lost or self.good_duplicated or self.good_error_rows:
            out.append(
                f"good images: lost {self.good_lost}, duplicated {self.good_duplicated}, "
                f"error rows {self.good_error_rows}"
            )
        out += [f"{o.kind} ({o.name!r}): {o.rows} rows" for o in self.odd if not o.ok]
        if self.duckdb_rows != self.pyarrow_rows:
            out.append(f"pyarrow read {self.pyarrow_rows} rows, DuckDB {self.duckdb_rows}")
        return out


def write_odd_files(folder: Path) -> list[tuple[bytes, str]]:
    """The odd objects of issue 15 items 3-4, as (raw file name, kind)."""
    from PIL import Image

    from tests.tagging_helpers import encode

    img = small_jpegs(1, seed=99)[0]
    odd: list[tuple[bytes, str]] = []

    def put(name: str | bytes, kind: str, data: bytes | None = None) -> None:
        raw = name if isinstance(name, bytes) else name.encode()
        if data is not None:
            with open(os.path.join(os.fsencode(folder), raw), "wb") as f:
                f.write(data)
        odd.append((raw, kind))

    os.mkfifo(folder / "fifo.jpg")
    odd.append((b"fifo.jpg", "FIFO"))
    os.symlink("loop_b.jpg", folder / "loop_a.jpg")
    os.symlink("loop_a.jpg", folder / "loop_b.jpg")
    odd += [(b"loop_a.jpg", "symlink loop"), (b"loop_b.jpg", "symlink loop")]
    os.symlink("/dev/zero", folder / "zero.jpg")
    odd.append((b"zero.jpg", "symlink to /dev/zero"))
    put(b"bad_\xff\xfe_name.jpg", "non-UTF-8 name", img)
    put("a::b.jpg", "'::' in name", img)
    put("hash#1.jpg", "'#' in name", img)
    put("what?.jpg", "'?' in name", img)
    put("with space.jpg", "space in name", img)
    put("ünïcødé_写真.jpg", "unicode name", img)
    frames = [Image.new("RGB", (48, 40), c) for c in ((200, 30, 30), (30, 30, 200))]
    buf = io.BytesIO()
    frames[0].save(buf, "MPO", save_all=True, append_images=frames[1:])
    put("camera.mpo", ".mpo file", buf.getvalue())
    big = folder / "oversize.jpg"
    with open(big, "wb") as f:  # sparse: over the 100 MiB default cap, costs no disk
        f.write(encode(Image.new("RGB", (8, 8)), "JPEG"))
        f.truncate(101 * 2**20)
    odd.append((b"oversize.jpg", "over the byte cap"))
    return odd


def uri_name(uri: str) -> str:
    path = urlsplit(uri).path if uri.startswith("file:") else uri
    return unquote(path.rsplit("/", 1)[-1]) if uri.startswith("file:") else path.rsplit("/", 1)[-1]


def local_soak(args: argparse.Namespace, tiny_home: Path, version: str, scratch: Path) -> LocalSoak:
    import duckdb
    import pyarrow.dataset as pads

    from tests.tagging_helpers import write_images

    folder = scratch / "odd_folder"
    good = write_images(folder, args.local_good, seed=7)
    odd = write_odd_files(folder)
    (folder / "notes.txt").write_text("not an image: skipped for its extension, and counted\n")
    out = scratch / "odd_out"
    (scratch / "run-local" / "prefect").mkdir(parents=True)
    env = bench_env(scratch / "run-local")
    env["MULTITAG_HOME"] = str(tiny_home)
    report = LocalSoak(good=len(good))
    report.run = run_tag(
        "local",
        str(folder),
        str(out),
        env,
        ["--model", version, "--shard-size", "8"],
        args.local_timeout,
    )
    print(
        f"local run: {status(report.run)}",
        flush=True,
    )
    parts = sorted(out.glob("*/model=*/part-*.parquet"))
    if parts:
        t = pads.dataset([str(p) for p in parts], format="parquet").to_table(
            columns=["image_uri", "error"]
        )
        uris, errors = t.column("image_uri").to_pylist(), t.column("error").to_pylist()
        con = duckdb.connect()
        (report.duckdb_rows,) = con.execute(
            "SELECT count(*) FROM read_parquet(?)", [[str(p) for p in parts]]
        ).fetchall()[0]
        con.close()
    else:
        uris, errors = [], []
    report.pyarrow_rows = len(uris)
    by_name: dict[str, list[str | None]] = collections.defaultdict(list)
    for u, e in zip(uris, errors, strict=True):
        by_name[uri_name(u)].append(e)
    good_names = {p.name for p in good}
    report.good_rows = sum(len(by_name[n]) for n in good_names)
    report.good_lost = sum(1 for n in good_names if not by_name[n])
    report.good_duplicated = sum(max(0, len(by_name[n]) - 1) for n in good_names)
    report.good_error_rows = sum(e is not None for n in good_names for e in by_name[n])
    manifest_text = "".join(m.read_text(errors="replace") for m in out.glob("*/_manifests/*.json"))
    for raw, kind in odd:
        names = {
            os.fsdecode(raw),
            raw.decode("utf-8", "replace"),
            raw.decode("utf-8", "backslashreplace"),  # how the run summary shows such names
        }
        rows = [e for n in names for e in by_name.get(n, [])]
        skipped = any(n in manifest_text or json.dumps(n)[1:-1] in manifest_text for n in names)
        report.odd.append(
            OddFile(
                name=raw.decode("utf-8", "backslashreplace"),
                kind=kind,
                rows=len(rows),
                tagged=sum(e is None for e in rows),
                errors=[e for e in rows if e is not None],
                skipped_in_manifest=skipped,
            )
        )
    return report


# ================================================================================ report


def describe(
    s3: S3Soak | None, local: LocalSoak | None, args: argparse.Namespace, total_s: float
) -> str:
    lines = [
        f"`python -m benchmarks.soak --images {args.images}` ({environment_line()}); "
        f"soak wall {total_s:.0f} s.",
        "",
    ]
    if s3 is not None:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(s3.faults.items(), key=lambda kv: -kv[1]))
        clean_wall = s3.clean.wall_s if s3.clean else float("nan")
        lines += [
            f"S3 (moto through tests/s3_faults.py): {s3.images:,} images of {IMG_SIZE}x{IMG_SIZE}, "
            f"{s3.shards} shards of {args.shard_size}; kill -9 of a run after "
            f"{s3.killed_after_parts} shards, then two runs at once with a "
            f"{s3.token_window_s:.0f} s window of `403 ExpiredToken` on every request "
            f"({s3.token_window_faults} refused), then a final rerun.",
            "",
            table(
                ["", "value"],
                [
                    ["requests (faulty phases)", f"{s3.requests_faulty:,}"],
                    [
                        "faults injected",
                        f"{sum(s3.faults.values()):,} ({s3.fault_fraction:.1%} of requests)",
                    ],
                    ["by kind", faults or "-"],
                    [
                        "runs (exit, wall s)",
                        "; ".join(
                            f"{r.label} {'kill -9' if r.killed else r.returncode} {r.wall_s:.0f}"
                            for r in s3.runs
                        ),
                    ],
                    [
                        "wall, faulty phases / fault-free run",
                        f"{s3.faulty_wall_s:.0f} s / {clean_wall:.0f} s "
                        f"({s3.faulty_wall_s / clean_wall:.1f}x)",
                    ],
                ],
            ),
            "",
            table(
                [
                    "output",
                    "reader",
                    "rows",
                    "images",
                    "lost",
                    "duplicated",
                    "error rows",
                    "unexpected",
                ],
                [
                    [
                        name,
                        c.reader,
                        c.rows,
                        c.distinct_images,
                        c.lost,
                        c.duplicated,
                        c.error_rows,
                        c.unexpected,
                    ]
                    for name, counts in (("fault-free", s3.clean_counts), ("faulty", s3.counts))
                    for c in counts
                ],
            ),
        ]
        errs = {m: n for c in s3.counts[:1] for m, n in c.errors_by_message.items()}
        if errs:
            lines += ["", "Error rows in the faulty output (first 90 chars):"]
            lines += [f"- {n} x `{m}`" for m, n in errs.items()]
    if local is not None:
        run = local.run
        lines += [
            "",
            f"Local disk with odd files: {local.good} good images + {len(local.odd)} odd entries; "
            f"run exit {run and run.returncode}{' (TIMED OUT)' if run and run.timed_out else ''}, "
            f"{run and run.wall_s:.0f} s; good images: {local.good_rows} rows, "
            f"lost {local.good_lost}, "
            f"duplicated {local.good_duplicated}, error rows {local.good_error_rows}; "
            f"pyarrow {local.pyarrow_rows} rows, DuckDB {local.duckdb_rows}.",
            "",
            table(
                ["odd file", "kind", "rows", "outcome"],
                [
                    [
                        f"`{o.name}`",
                        o.kind,
                        o.rows,
                        ("tagged" if o.tagged else "; ".join(e[:60] for e in o.errors))
                        or ("skipped, counted in manifest" if o.skipped_in_manifest else "MISSING"),
                    ]
                    for o in local.odd
                ],
            ),
        ]
    problems = (s3.problems() if s3 else []) + (local.problems() if local else [])
    lines += [
        "",
        "Verdict: "
        + (
            "PASS (nothing lost, duplicated or turned into an error row)"
            if not problems
            else "FAIL"
        ),
    ]
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines)


def append_results(text: str) -> None:
    """Append a section at the end of RESULTS.md (never rewrite what is there)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(f"\n## Reliability soak ({stamp})\n\n{text.rstrip()}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--images", type=int, default=5000, help="images on the S3 server (default 5000)"
    )
    p.add_argument(
        "--quick", action="store_true", help="300 images, short windows: checks the harness"
    )
    p.add_argument(
        "--fault-rate", type=float, default=0.06, help="transient fault rate (default 0.06)"
    )
    p.add_argument(
        "--token-window",
        type=float,
        default=None,
        help="seconds of ExpiredToken (default 15; quick 6)",
    )
    p.add_argument("--shard-size", type=int, default=None, help="default: images/50, at least 10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-good", type=int, default=24, help="good images in the local folder")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds per tag run")
    p.add_argument("--local-timeout", type=float, default=300)
    p.add_argument("--skip-s3", action="store_true")
    p.add_argument("--skip-local", action="store_true")
    p.add_argument(
        "--append-results", action="store_true", help="append the figures to benchmarks/RESULTS.md"
    )
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args(argv)
    if args.quick:
        args.images = min(args.images, 300)
        args.run_timeout = min(args.run_timeout, 600)
    args.token_window = args.token_window or (6.0 if args.quick else 15.0)
    args.shard_size = args.shard_size or max(10, args.images // 50)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for k, v in {
        "OMP_WAIT_POLICY": "PASSIVE",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }.items():
        os.environ.setdefault(k, v)
    os.environ.update(s3_env())
    from tests.tagging_helpers import register_tiny_model

    scratch = Path(tempfile.mkdtemp(prefix="multitag-soak-"))
    t0 = time.monotonic()
    try:
        tiny = register_tiny_model(scratch / "home", scratch / "work")
        print(f"registered tiny model {tiny.version} in {time.monotonic() - t0:.1f} s", flush=True)
        s3 = None if args.skip_s3 else s3_soak(args, tiny.home, tiny.version, scratch)
        local = None if args.skip_local else local_soak(args, tiny.home, tiny.version, scratch)
        text = describe(s3, local, args, time.monotonic() - t0)
        print("\n" + text, flush=True)
        if args.append_results and not args.quick:
            append_results(text)
        if args.json:
            args.json.write_text(
                json.dumps(
                    {"s3": s3 and _jsonable(s3), "local": local and _jsonable(local)},
                    indent=2,
                    default=str,
                )
            )
        problems = (s3.problems() if s3 else []) + (local.problems() if local else [])
        return 1 if problems else 0
    finally:
        if args.keep:
            print(f"scratch kept at {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _jsonable(obj: Any) -> dict[str, Any]:
    d = asdict(obj)
    for r in (
        d.get("runs", [])
        + ([d["run"]] if d.get("run") else [])
        + ([d["clean"]] if d.get("clean") else [])
    ):
        r["log"] = "\n".join(r["log"].splitlines()[-40:])
    return d


if __name__ == "__main__":
    sys.exit(main())
