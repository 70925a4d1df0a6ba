"""The tags output: Parquet schema, rows to tables, shard file names, and reading it back.

What `data_contracts/tags_output.yaml` says in code: `tags_schema()` is the Parquet schema
every shard is written with, `validate_tags_table` checks the contract's quality rules on a
partition read back, and `current_rows` / `read_current` give one row per image (its highest
attempt: a retry supersedes an error row). Shard files are named `part-<shard id>.parquet`;
`part_name` and `shard_id_of` are the one place that knows it.

pyarrow is imported inside the functions that use it (here and across `multitag.tagging`):
~0.35 s of one core (measured) that `multitag tag` would otherwise spend before its model
prefetch (`plan.prefetch_tagger`), which imports this package and needs pyarrow only later.
"""

from __future__ import annotations

import functools
import io
import itertools
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from multitag.inference.tagger import TagRow
from multitag.storage import fs_and_path

if TYPE_CHECKING:
    import pyarrow as pa

CONTRACT_VERSION = "1.2.0"  # data_contracts/tags_output.yaml
_PART_RE = re.compile(r"^part-(\d{6,}-\d{6,})\.parquet$")


def part_name(shard_id: str) -> str:
    """The file name of a shard's Parquet file inside its model partition."""
    return f"part-{shard_id}.parquet"


def shard_id_of(name: str) -> str | None:
    """The shard id of a shard file's name, None for any other name (temp files, ...)."""
    m = _PART_RE.match(name)
    return m.group(1) if m else None


@functools.lru_cache(maxsize=1)
def tags_schema() -> pa.Schema:
    """The Parquet schema of data_contracts/tags_output.yaml."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("image_uri", pa.string(), nullable=False),
            pa.field("labels", pa.list_(pa.string())),
            pa.field("scores", pa.map_(pa.string(), pa.float32())),
            pa.field("top_label", pa.string()),
            pa.field("top_score", pa.float32()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("model_version", pa.string(), nullable=False),
            pa.field("tagged_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("error", pa.string()),
            pa.field("attempt", pa.int32(), nullable=False),
        ],
        metadata={"multitag.contract": f"tags_output {CONTRACT_VERSION}"},
    )


def rows_to_table(
    rows: Sequence[TagRow], model_version: str, attempts: Sequence[int] = ()
) -> pa.Table:
    """Rows as an Arrow table of `tags_schema()`; `attempts` per row (empty: all first rows)."""
    import pyarrow as pa

    if attempts and len(attempts) != len(rows):
        raise ValueError(f"{len(attempts)} attempts for {len(rows)} rows")
    schema = tags_schema()
    columns = {
        "image_uri": [r.image_uri for r in rows],
        "labels": [r.labels for r in rows],
        "scores": [list(r.scores.items()) if r.scores is not None else None for r in rows],
        "top_label": [r.top_label for r in rows],
        "top_score": [r.top_score for r in rows],
        "width": [r.width for r in rows],
        "height": [r.height for r in rows],
        "model_version": [model_version] * len(rows),
        "tagged_at": [r.tagged_at for r in rows],
        "error": [r.error for r in rows],
        "attempt": list(attempts) if attempts else [1] * len(rows),
    }
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def parquet_bytes(table: pa.Table, metadata: Mapping[str, str]) -> bytes:
    """`table` as zstd Parquet bytes, `metadata` added to its schema's (the footer)."""
    import pyarrow.parquet as pq

    meta = {
        **(table.schema.metadata or {}),
        **{k.encode(): v.encode() for k, v in metadata.items()},
    }
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
    return buf.getvalue()


def validate_tags_table(table: pa.Table, *, model_version: str | None = None) -> list[str]:
    """Violations of data_contracts/tags_output.yaml's quality rules ("rule: what, where").

    Checks a whole partition read back (e.g. `pyarrow.dataset.dataset(partition)`); an empty
    list means the output honours the contract. Reports at most a few rows per rule.
    """
    import pyarrow.compute as pc

    problems: list[str] = []
    table = with_attempt(table)
    keys = table.group_by(["image_uri", "attempt"]).aggregate([("image_uri", "count")])
    dup = keys.filter(pc.greater(keys.column("image_uri_count"), 1))
    if dup.num_rows:
        pairs = zip(*(dup.column(c).to_pylist()[:5] for c in ("image_uri", "attempt")), strict=True)
        examples = list(pairs)
        problems.append(
            f"unique_image_per_model: {dup.num_rows} (image, attempt) repeated, e.g. {examples}"
        )
    problems.extend(_attempt_problems(table))
    versions = pc.unique(table.column("model_version")).to_pylist()
    if len(versions) > 1 or (model_version is not None and versions not in ([model_version], [])):
        problems.append(f"one_model_per_partition: model_version values {versions[:5]}")
    for row in iter_rows(table):
        problems.extend(_row_problems(row))
        if len(problems) >= 50:
            problems.append("... (stopped after 50 problems)")
            break
    return problems


def with_attempt(table: pa.Table) -> pa.Table:
    """`table` with an `attempt` column: files of contract 1.0 (before retries) have none, and
    a dataset read with `tags_schema()` gives them nulls; either way they are first rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "attempt" not in table.column_names:
        return table.append_column("attempt", pa.array([1] * table.num_rows, pa.int32()))
    i = table.column_names.index("attempt")
    filled = pc.fill_null(table.column("attempt"), 1).cast(pa.int32())
    return table.set_column(i, pa.field("attempt", pa.int32(), nullable=False), filled)


def _attempt_problems(table: pa.Table) -> list[str]:
    """attempts_supersede_errors: an image's attempts are 1..n, and every row but the latest
    is an error row (a new attempt is claimed only for an image whose latest row failed)."""
    import pyarrow.compute as pc

    if table.num_rows and pc.min(table.column("attempt")).as_py() < 1:
        return ["attempts_supersede_errors: an attempt is below 1"]
    per = table.group_by("image_uri").aggregate([("attempt", "max"), ("attempt", "count_distinct")])
    gaps = per.filter(pc.not_equal(per.column("attempt_max"), per.column("attempt_count_distinct")))
    out = []
    if gaps.num_rows:
        out.append(
            f"attempts_supersede_errors: {gaps.num_rows} image(s) with missing attempts, "
            f"e.g. {gaps.column('image_uri').to_pylist()[:5]}"
        )
    current = current_rows(table)
    if current.num_rows < table.num_rows:
        is_current = pc.is_in(_row_keys(table), value_set=_row_keys(current))
        old = table.filter(pc.invert(is_current))
        bad = old.filter(pc.is_null(old.column("error")))
        if bad.num_rows:
            out.append(
                f"attempts_supersede_errors: {bad.num_rows} superseded row(s) without an error, "
                f"e.g. {bad.column('image_uri').to_pylist()[:5]}"
            )
    return out


def _row_keys(table: pa.Table) -> pa.Array:
    """`<attempt>:<image_uri>` per row: one value to match (image, attempt) pairs with is_in."""
    import pyarrow as pa
    import pyarrow.compute as pc

    attempt = pc.cast(table.column("attempt"), pa.string())
    return pc.binary_join_element_wise(attempt, table.column("image_uri"), ":").combine_chunks()


def current_rows(table: pa.Table) -> pa.Table:
    """One row per image: the row with its highest `attempt` (a retry supersedes an error).

    The pyarrow form of the contract's "current rows" query (DuckDB: `QUALIFY row_number()
    OVER (PARTITION BY image_uri ORDER BY coalesce(attempt, 1) DESC) = 1`). Rows come back
    sorted by image_uri. Rows without an `attempt` (contract 1.0 files) are first attempts.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = with_attempt(table)
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, [("image_uri", "ascending"), ("attempt", "descending")])
    ordered = table.take(order)
    uris = ordered.column("image_uri").combine_chunks()
    changed = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1))
    return ordered.filter(pa.concat_arrays([pa.array([True]), changed]))


def read_current(partition_uri: str) -> pa.Table:
    """The current rows of a model partition (`model=<version>/`): one per image."""
    import pyarrow.dataset as pads

    fs, path = fs_and_path(partition_uri)
    fs.invalidate_cache(path)
    files = [p for p in fs.find(path) if shard_id_of(posixpath.basename(p))]
    if not files:
        return tags_schema().empty_table()
    dataset = pads.dataset(files, schema=tags_schema(), filesystem=fs, format="parquet")
    return current_rows(dataset.to_table())


def iter_rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    """The rows of `table` as dicts, 10,000 at a time (never the whole table in Python)."""
    for batch in table.to_batches(max_chunksize=10_000):
        yield from batch.to_pylist()


def _row_problems(row: Mapping[str, Any]) -> list[str]:
    uri, error = row["image_uri"], row["error"]
    result_cols = ("labels", "scores", "top_label", "top_score")
    if error is not None:
        set_cols = [c for c in result_cols if row[c] is not None]
        return [f"error_xor_result: {uri} has an error and {set_cols}"] if set_cols else []
    missing = [c for c in (*result_cols, "width", "height") if row[c] is None]
    if missing:
        return [f"error_xor_result: {uri} has no error but lacks {missing}"]
    scores = dict(row["scores"])
    out = []
    if not all(0.0 <= v <= 1.0 for v in [*scores.values(), row["top_score"]]):
        out.append(f"scores_are_probabilities: {uri} has a score outside [0, 1]")
    labels = row["labels"]
    if any(lab not in scores for lab in labels) or any(
        scores[a] < scores[b] for a, b in itertools.pairwise(labels)
    ):
        out.append(f"labels_above_threshold_by_score: {uri} labels {labels} vs scores {scores}")
    if row["top_label"] not in scores or row["top_score"] != max(scores.values()):
        out.append(f"top_is_max: {uri} top {row['top_label']}={row['top_score']} vs {scores}")
    return out
