"""The claim log: which shard holds each image, decided by exclusive create of epoch files.

`_plans/model=<version>/epoch-<N>.arrow` files, one per claim, each an Arrow IPC table of
(shard, image_uri, attempt) with the claiming run's id in its metadata. `claim_epoch` creates
the next epoch with an exclusive create; a run that loses the race for an epoch reads the
winner's, drops those images and tries the next. Why that makes every image's row exactly
once is told in the `multitag.tagging` package docstring.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Container
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from multitag.config import TagParams
from multitag.inference.faults import TaggingError
from multitag.storage import fs_and_path, join, read_bytes, write_bytes_atomic
from multitag.tagging.output import current_rows, part_name, shard_id_of, tags_schema

if TYPE_CHECKING:
    import pyarrow as pa

PLAN_FORMAT = "multitag-plan/1"
PLAN_FORMAT_RETRIES = "multitag-plan/2"  # an epoch with retries: `attempt` > 1 in some rows
PLANS_DIR = "_plans"
_EPOCH_RE = re.compile(r"^epoch-(\d{6,})\.arrow$")
_MAX_EPOCH_TRIES = 1000


class Claim(NamedTuple):
    """One shard of a claim epoch: its id, its images and each image's attempt number."""

    shard_id: str
    uris: list[str]
    attempts: list[int]


def no_retries() -> pa.Table:
    """An empty (image_uri, attempt) table: nothing to claim again."""
    import pyarrow as pa

    return pa.table({"image_uri": pa.array([], pa.string()), "attempt": pa.array([], pa.int32())})


def retry_candidates(log: ClaimLog, partition: str, listing: pa.Array) -> pa.Table:
    """(image_uri, next attempt) of listed images whose latest row is an error, to claim again.

    Only images whose every claim is finished: an image in an unfinished shard (a retry in
    progress, or killed) is tagged by resuming that shard, never claimed twice. The rows are
    read from the finished shards the log saw, so the "latest" row is the latest one there.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    if not log.finished:
        return no_retries()
    fs, _ = fs_and_path(partition)
    files = [fs_and_path(join(partition, part_name(sid)))[1] for sid in sorted(log.finished)]
    schema = pa.schema([tags_schema().field(n) for n in ("image_uri", "error", "attempt")])
    rows = pads.dataset(files, schema=schema, filesystem=fs, format="parquet").to_table()
    latest = current_rows(rows)
    failed = latest.filter(pc.is_valid(latest.column("error")))
    in_progress = pa.array([u for c in log.unfinished() for u in c.uris], pa.string())
    keep = pc.and_(
        pc.is_in(failed.column("image_uri"), value_set=listing),  # gone from the source: no
        pc.invert(pc.is_in(failed.column("image_uri"), value_set=in_progress)),
    )
    failed = failed.filter(keep)
    next_attempt = pc.add(failed.column("attempt"), 1).cast(pa.int32())
    return pa.table({"image_uri": failed.column("image_uri"), "attempt": next_attempt})


def claim_epoch(
    plans: str, log: ClaimLog, new: pa.Array, retry: pa.Table, params: TagParams, run_id: str
) -> tuple[int | None, list[Claim]]:
    """Claim `new` (first attempts) and `retry` as the next epoch; on a lost race, drop what
    the winner claimed and try the epoch after.

    Returns (the epoch created or None when nothing was left to claim, its shards). A retry
    is dropped when the winner's epoch holds that image: two runs never retry it both.
    """
    import pyarrow.compute as pc

    for _ in range(_MAX_EPOCH_TRIES):
        if len(new) == 0 and retry.num_rows == 0:
            return None, []
        candidate = log.next_epoch()
        try:
            claims = _write_epoch(plans, candidate, new, retry, params, run_id)
            return candidate, claims
        except FileExistsError:
            log.absorb(plans, candidate)  # a concurrent run won this epoch: take its claims out
            new = new.filter(pc.invert(pc.is_in(new, value_set=log.claimed_uris())))
            won = log.epochs[candidate].column("image_uri")
            retry = retry.filter(pc.invert(pc.is_in(retry.column("image_uri"), value_set=won)))
    raise TaggingError(f"could not claim an epoch in {plans} after {_MAX_EPOCH_TRIES} tries")


def _shard_id(epoch: int, index: int) -> str:
    return f"{epoch:06d}-{index:06d}"


def _epoch_uri(plans: str, epoch: int) -> str:
    return join(plans, f"epoch-{epoch:06d}.arrow")


def _epoch_table(
    epoch: int, new: pa.Array, retry: pa.Table, params: TagParams, run_id: str
) -> pa.Table:
    """The claim file's rows (shard, image_uri, attempt), sorted by image_uri."""
    import pyarrow as pa
    import pyarrow.compute as pc

    uris = pa.concat_arrays([new, retry.column("image_uri").combine_chunks()])
    attempts = pa.concat_arrays(
        [pa.array(np.ones(len(new), np.int32)), retry.column("attempt").combine_chunks()]
    )
    order = pc.sort_indices(uris)
    n = len(uris)
    index = pa.array(np.arange(n, dtype=np.int64) // params.shard_size, type=pa.int32())
    meta = {
        # Epochs with retries use format 2, which code from before retries refuses to read
        # (it would write the retried images' rows again as first attempts).
        "format": PLAN_FORMAT_RETRIES if retry.num_rows else PLAN_FORMAT,
        "run_id": run_id,
        "epoch": str(epoch),
        "source": params.source,
        "shard_size": str(params.shard_size),
        "created_at": datetime.now(UTC).isoformat(),
    }
    table = pa.table(
        {"shard": index, "image_uri": uris.take(order), "attempt": attempts.take(order)}
    )
    return table.replace_schema_metadata(meta)


def _write_epoch(
    plans: str, epoch: int, new: pa.Array, retry: pa.Table, params: TagParams, run_id: str
) -> list[Claim]:
    """Claim `new` and `retry` as epoch `epoch` (exclusive create); returns its shards.

    FileExistsError means another run won the epoch, unless the file holds this run's id:
    then our own create succeeded and its answer was lost (the client's retry of the PUT
    got 412), and the claims are ours.
    """
    import pyarrow as pa

    table = _epoch_table(epoch, new, retry, params, run_id)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    uri = _epoch_uri(plans, epoch)
    try:
        write_bytes_atomic(uri, sink.getvalue().to_pybytes(), exclusive=True)
    except FileExistsError:
        existing = _read_epoch(uri)
        if (existing.schema.metadata or {}).get(b"run_id") != run_id.encode():
            raise
        table = existing
    return _epoch_claims(epoch, table)


def _read_epoch(uri: str) -> pa.Table:
    import pyarrow as pa

    table = pa.ipc.open_file(pa.BufferReader(read_bytes(uri))).read_all()
    meta = table.schema.metadata or {}
    if meta.get(b"format") not in (PLAN_FORMAT.encode(), PLAN_FORMAT_RETRIES.encode()):
        raise TaggingError(f"{uri} is not a {PLAN_FORMAT} claim file")
    return table


def _epoch_claims(epoch: int, table: pa.Table, skip: Container[str] = frozenset()) -> list[Claim]:
    """The shards of one epoch's claim table not in `skip`, in shard order.

    (Claim files from before retries have no `attempt` column: all first attempts.)
    """
    shard = table.column("shard").to_numpy()
    order = np.argsort(shard, kind="stable")
    ids, starts = np.unique(shard[order], return_index=True)
    ends = [*starts[1:], len(order)]
    uris = table.column("image_uri")
    if "attempt" in table.column_names:
        attempts = table.column("attempt").to_numpy()
    else:
        attempts = np.ones(len(shard), np.int32)
    out = []
    for index, start, end in zip(ids, starts, ends, strict=True):
        rows = order[start:end]
        sid = _shard_id(epoch, int(index))
        if sid in skip:
            continue  # finished: its URIs are never turned into Python strings
        out.append(Claim(sid, uris.take(rows).to_pylist(), attempts[rows].tolist()))
    return out


class ClaimLog:
    """Every epoch of a partition's claim log, and which of its shards are finished."""

    def __init__(self, finished: set[str]) -> None:
        self.finished = finished
        self.epochs: dict[int, pa.Table] = {}
        self.run_ids: dict[int, str] = {}

    @classmethod
    def read(cls, plans: str, partition: str) -> ClaimLog:
        log = cls(_finished_shard_ids(partition))
        for epoch in _list_epochs(plans):
            log.absorb(plans, epoch)
        return log

    def absorb(self, plans: str, epoch: int) -> None:
        table = _read_epoch(_epoch_uri(plans, epoch))
        self.epochs[epoch] = table
        self.run_ids[epoch] = (table.schema.metadata or {}).get(b"run_id", b"?").decode()

    def next_epoch(self) -> int:
        return max(self.epochs, default=0) + 1

    def claimed_uris(self) -> pa.Array:
        """Every image any epoch claimed (an image claimed again for a retry appears twice)."""
        import pyarrow as pa

        chunks = [c for t in self.epochs.values() for c in t.column("image_uri").chunks]
        return pa.chunked_array(chunks, type=pa.string()).combine_chunks()

    def finished_uris(self) -> pa.Array:
        import pyarrow as pa
        import pyarrow.compute as pc

        done: dict[int, list[int]] = {}
        for sid in self.finished:
            epoch, index = (int(x) for x in sid.split("-"))
            done.setdefault(epoch, []).append(index)
        parts = []
        for epoch, table in self.epochs.items():
            value_set = pa.array(done.get(epoch, []), type=pa.int32())
            mask = pc.is_in(table.column("shard"), value_set=value_set)
            parts.extend(table.column("image_uri").filter(mask).chunks)
        return pa.chunked_array(parts, type=pa.string()).combine_chunks()

    def unfinished(self) -> list[Claim]:
        """Every claimed shard without a Parquet file, in id order."""
        return [
            c
            for epoch, table in sorted(self.epochs.items())
            for c in _epoch_claims(epoch, table, skip=self.finished)
        ]

    def planned_by(self, shard_id: str) -> str:
        return self.run_ids.get(int(shard_id.split("-")[0]), "?")


def _fresh_ls(uri: str) -> list[str]:
    """Names directly under uri, bypassing fsspec's listing cache (other runs write here)."""
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)
    try:
        return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def _list_epochs(plans: str) -> list[int]:
    return sorted(int(m.group(1)) for n in _fresh_ls(plans) if (m := _EPOCH_RE.match(n)))


def _finished_shard_ids(partition: str) -> set[str]:
    return {sid for n in _fresh_ls(partition) if (sid := shard_id_of(n))}
