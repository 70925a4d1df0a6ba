"""One shard: tag its images and write its Parquet file whole, exactly once.

A `ShardSpec` is what the plan hands a shard task (a few URIs, picklable); `tag_shard` tags
them with the process's `Tagger` (taking rows its head start already has) and creates
`part-<shard id>.parquet` exclusively. A file that exists is another run's finished shard
("exists"), or this run's own earlier write whose answer was lost ("written", counted from
the file), recognised by the run id in the Parquet footer; a create that fails because
another run wrote first drops this attempt's rows ("lost_race").
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from multitag.inference.faults import TaggingError
from multitag.inference.tagger import Tagger, TagRow
from multitag.storage import fs_and_path, write_bytes_atomic
from multitag.tagging import headstart
from multitag.tagging.output import iter_rows, parquet_bytes, rows_to_table, with_attempt

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: small (a list of URIs), picklable, enough to tag and write it."""

    shard_id: str
    part_uri: str
    uris: tuple[str, ...]
    model_version: str
    planned_by: str  # run id that claimed these images
    attempts: tuple[int, ...] = ()  # per uri, when some are retries (--retry-errors); () = all 1


@dataclass(frozen=True)
class ShardResult:
    """What happened to one shard; small, so a flow can collect thousands of them.

    status: "written" (this call wrote it, or an earlier try of this run's task did and
    its answer was lost: counted from the file), "exists" (already finished by another run,
    nothing done), "lost_race" (tagged, but another run wrote it first; rows dropped).
    """

    shard_id: str
    part_uri: str
    status: str
    n_images: int
    n_tagged: int = 0
    n_failed: int = 0
    n_none: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    scorer: str = ""  # which scorer tagged it and why (`Tagger.precision_choice`)
    n_head_start: int = 0  # of n_tagged + n_failed: tagged before the run began (headstart)
    n_retried: int = 0  # of n_images: retries of images whose latest row was an error
    n_retried_tagged: int = 0  # of n_retried: tagged this time (no error)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tag_shard(
    spec: ShardSpec,
    tagger: Tagger,
    *,
    run_id: str = "",
    on_batch: Callable[[int], None] | None = None,
) -> ShardResult:
    """Tag one shard and write its Parquet file whole, exactly once (see `multitag.tagging`).

    Idempotent: a shard whose file exists is skipped without reading an image.
    """
    t0 = time.perf_counter()
    if tagger.model_version != spec.model_version:
        raise TaggingError(
            f"shard {spec.shard_id} belongs to model {spec.model_version} but the tagger holds "
            f"{tagger.model_version}"
        )
    ready, head_s = headstart.take(tagger, spec.uris)  # rows tagged while the server booted
    if _fresh_exists(spec.part_uri):
        own = _own_earlier_write(spec, run_id)  # a retried task whose write succeeded
        if own is None:
            return ShardResult(spec.shard_id, spec.part_uri, "exists", len(spec.uris))
        seconds = {"total_s": round(time.perf_counter() - t0, 4)}
        return _count_rows(spec, own, seconds, _scorer_of(own))
    rows: list[TagRow] = []
    prepare_s = model_s = 0.0
    todo = [u for u in spec.uris if u not in ready] if ready else spec.uris
    if ready and on_batch is not None:
        on_batch(len(ready))
    for batch in tagger.tag(todo, on_batch=on_batch):
        rows.extend(batch.rows)
        prepare_s += batch.prepare_s
        model_s += batch.model_s
    if ready:
        by_uri = {row.image_uri: row for row in rows} | ready
        rows = [by_uri[u] for u in spec.uris]
    t_write = time.perf_counter()
    written = _write_shard(spec, rows, run_id, tagger.scorer_note)
    t_end = time.perf_counter()
    seconds = {"prepare_s": prepare_s, "model_s": model_s, "write_s": t_end - t_write,
               "total_s": t_end - t0, "head_start_s": head_s}  # fmt: skip
    seconds = {k: round(v, 4) for k, v in seconds.items()}
    if written is None:
        return ShardResult(spec.shard_id, spec.part_uri, "lost_race", len(rows), seconds=seconds)
    return dataclasses.replace(
        _count_rows(spec, written, seconds, _scorer_of(written)), n_head_start=len(ready)
    )


def _write_shard(
    spec: ShardSpec, rows: Sequence[TagRow], run_id: str, scorer: str = ""
) -> pa.Table | None:
    """Exclusive create of the whole Parquet file; returns the rows the file now holds.

    None: another run wrote this shard first (our rows are dropped, "lost_race"). When the
    file exists but is this run's own earlier write (a retried task whose PUT succeeded and
    whose answer was lost, so the client's retry got 412), the file's rows are returned:
    the shard counts as written once, with what is stored, not what this attempt computed.
    """
    meta = {"multitag.shard_id": spec.shard_id, "multitag.run_id": run_id,
            "multitag.planned_by": spec.planned_by, "multitag.scorer": scorer}  # fmt: skip
    table = rows_to_table(rows, spec.model_version, spec.attempts)
    data = parquet_bytes(table, meta)
    try:
        write_bytes_atomic(spec.part_uri, data, exclusive=True)
    except FileExistsError:
        return _own_earlier_write(spec, run_id)
    return table.replace_schema_metadata(
        {**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in meta.items()}}
    )


def _own_earlier_write(spec: ShardSpec, run_id: str) -> pa.Table | None:
    """The rows of `spec.part_uri` if this run (`run_id`) wrote that file, else None.

    Recognised by the Parquet footer's `multitag.run_id` and `multitag.shard_id`: run ids
    are unique per run, and a run tags a shard in one task at a time (Prefect retries it).
    An empty run_id (library calls without one) never matches.
    """
    import pyarrow.parquet as pq

    if not run_id:
        return None
    fs, path = fs_and_path(spec.part_uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        meta = pf.schema_arrow.metadata or {}
        if meta.get(b"multitag.run_id") != run_id.encode():
            return None
        if meta.get(b"multitag.shard_id") != spec.shard_id.encode():
            return None
        names = [n for n in ("error", "labels", "attempt") if n in pf.schema_arrow.names]
        return pf.read(columns=names).replace_schema_metadata(meta)


def _scorer_of(table: pa.Table) -> str:
    return (table.schema.metadata or {}).get(b"multitag.scorer", b"").decode()


def _count_rows(
    spec: ShardSpec, table: pa.Table, seconds: dict[str, float], scorer: str = ""
) -> ShardResult:
    """A "written" result counted from the rows stored in the shard's file."""
    labels: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    n_none = n_failed = n_retried = n_retried_tagged = 0
    cols = ("error", "labels", "attempt")
    for r in iter_rows(with_attempt(table).select(cols)):
        retried = r["attempt"] > 1
        n_retried += retried
        if r["error"] is not None:
            n_failed += 1
            kinds[r["error"].split(":", 1)[0]] += 1
            continue
        n_retried_tagged += retried
        if r["labels"]:
            labels.update(r["labels"])
        else:
            n_none += 1
    return ShardResult(
        spec.shard_id,
        spec.part_uri,
        "written",
        table.num_rows,
        n_tagged=table.num_rows - n_failed,
        n_failed=n_failed,
        n_none=n_none,
        label_counts=dict(labels),
        error_kinds=dict(kinds),
        seconds=seconds,
        scorer=scorer,
        n_retried=n_retried,
        n_retried_tagged=n_retried_tagged,
    )


def _fresh_exists(uri: str) -> bool:
    """Whether uri exists now, bypassing fsspec's listing cache (other runs write here)."""
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)
    return fs.exists(path)
