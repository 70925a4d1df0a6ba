"""A run's summary: shard results folded into counts, rates, timings and drift, and the
manifest (`_manifests/<run id>.json`) written last, once per run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from multitag import registry
from multitag.storage import join, read_json, write_json_atomic
from multitag.tagging.drift import DriftReport, DriftRule, compute_drift
from multitag.tagging.plan import MANIFESTS_DIR, RunPlan
from multitag.tagging.shards import ShardResult
from multitag.training.lineage import dataset_sha256_of


@dataclass(frozen=True)
class TagSummary:
    """A run's outcome; `to_dict()` is the manifest."""

    run_id: str
    status: str  # "completed" or "failed"
    model_version: str
    source: str
    dataset: str
    output_uri: str
    manifest_uri: str
    listed: int
    tagged: int
    failed: int
    skipped: int
    resumed: int
    shards_written: int
    shards_skipped: int
    images_per_s: float | None
    started_at: str
    finished_at: str
    seconds: dict[str, float]
    error_kinds: dict[str, int]
    drift: DriftReport
    shards: list[ShardResult]
    params: dict[str, Any]
    error: str | None = None
    scorers: list[str] = field(default_factory=list)  # distinct `ShardResult.scorer` values
    retried: int = 0  # of tagged + failed: images whose latest row was an error, tagged again
    retried_tagged: int = 0  # of retried: tagged this time (the rest failed again)
    not_images: int = 0  # files left out of the listing for their extension (.txt, .mov)
    not_image_examples: list[str] = field(default_factory=list)  # the first few
    bad_names: int = 0  # local names that are not valid UTF-8: left out (rename to tag)
    bad_name_examples: list[str] = field(default_factory=list)  # shown with \x escapes
    # Lineage: the content hash of the data the model was trained on (None: not recorded).
    model_dataset_sha256: str | None = None
    operating_point: dict[str, Any] = field(default_factory=dict)  # RunPlan.operating_point

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_text(self) -> str:
        """The few lines a person reads at the end of `multitag tag`."""
        rate = f"{self.images_per_s:.1f} images/s" if self.images_per_s else "n/a images/s"
        lines = [
            f"run {self.run_id} ({self.status}) with model {self.model_version}",
            f"listed {self.listed}: tagged {self.tagged}, failed {self.failed}, "
            f"skipped {self.skipped} (already tagged)"
            + (f", resumed {self.resumed} from earlier runs" if self.resumed else ""),
            f"{self.shards_written} shard(s) written, {rate}, "
            f"{self.seconds.get('total_s', 0.0):.1f} s",
            f"output:   {self.output_uri}",
            f"manifest: {self.manifest_uri}",
        ]
        lines += [f"scorer:   {s}" for s in self.scorers]
        if self.operating_point.get("kind", "training") != "training":
            op = self.operating_point
            lines.append(f"operating point: {op['kind']} {op.get('value', op.get('path'))}"
                         + (f", never predicted: {op['never_predicted']}"
                            if op.get("never_predicted") else ""))  # fmt: skip
        if self.retried:
            lines.append(
                f"retried {self.retried} error row(s): {self.retried_tagged} now tagged, "
                f"{self.retried - self.retried_tagged} failed again"
            )
        if self.error_kinds:
            lines.append(
                "errors: " + ", ".join(f"{k} {v}" for k, v in sorted(self.error_kinds.items()))
            )
        if self.not_images:
            lines.append(f"not listed: {self.not_images} not images (by extension), e.g. "
                         f"{self.not_image_examples}")  # fmt: skip
        if self.bad_names:
            lines.append(f"not listed: {self.bad_names} names not valid UTF-8 (rename them to "
                         f"tag them), e.g. {self.bad_name_examples}")  # fmt: skip
        if self.drift.flagged:
            moved = {e.label: e for e in [*self.drift.labels, self.drift.none]}
            parts = [
                f"{lab} {moved[lab].rate:.2f} vs {moved[lab].train_rate:.2f} in training"
                for lab in self.drift.flagged
            ]
            lines.append("DRIFT: " + "; ".join(parts))
        elif self.drift.note:
            lines.append(f"drift: {self.drift.note}")
        if self.error:
            lines.append(f"ERROR: {self.error}")
        return "\n".join(lines)


def manifest_uri(plan: RunPlan) -> str:
    """Where the run of `plan` writes its manifest: `<dataset>/_manifests/<run id>.json`."""
    return join(plan.dataset_uri, MANIFESTS_DIR, f"{plan.run_id}.json")


def summarize_run(
    plan: RunPlan,
    results: Sequence[ShardResult],
    *,
    drift_rule: DriftRule | None = None,
    tag_s: float | None = None,
    error: str | None = None,
) -> TagSummary:
    """Fold shard results into the run's summary (counts, rates, drift, timings)."""
    finished = datetime.now(UTC)
    written = [r for r in results if r.status == "written"]
    others = [r for r in results if r.status != "written"]
    tagged = sum(r.n_tagged for r in written)
    failed = sum(r.n_failed for r in written)
    labels: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for r in written:
        labels.update(r.label_counts)
        kinds.update(r.error_kinds)
    n_none = sum(r.n_none for r in written)
    total_s = (finished - datetime.fromisoformat(plan.started_at)).total_seconds()
    tag_s = tag_s if tag_s is not None else max(total_s - plan.plan_s, 0.0)
    n_done = tagged + failed
    # Rows a head start tagged before the run began took time too (while the server booted).
    busy_s = tag_s + sum(r.seconds.get("head_start_s", 0.0) for r in written)
    return TagSummary(
        run_id=plan.run_id,
        status="failed" if error else "completed",
        model_version=plan.model_version,
        source=plan.source,
        dataset=plan.dataset,
        output_uri=plan.partition_uri,
        manifest_uri=manifest_uri(plan),
        listed=plan.n_listed,
        tagged=tagged,
        failed=failed,
        skipped=plan.n_skipped + sum(r.n_images for r in others),
        resumed=plan.n_resumed,
        shards_written=len(written),
        shards_skipped=len(others),
        images_per_s=round(n_done / busy_s, 2) if n_done and busy_s > 0 else None,
        started_at=plan.started_at,
        finished_at=finished.isoformat(),
        seconds={
            "plan_s": plan.plan_s,
            "tag_s": round(tag_s, 3),
            "total_s": round(total_s, 3),
            **_stage_seconds(written),
        },
        error_kinds=dict(kinds),
        drift=compute_drift(labels, n_none, tagged, plan.baseline, drift_rule),
        shards=list(results),
        params=plan.params,
        error=error,
        scorers=sorted({r.scorer for r in written if r.scorer}),
        retried=sum(r.n_retried for r in written),
        retried_tagged=sum(r.n_retried_tagged for r in written),
        not_images=plan.not_images.count,
        not_image_examples=plan.not_images.examples,
        bad_names=plan.bad_names.count,
        bad_name_examples=plan.bad_names.examples,
        model_dataset_sha256=_model_dataset_sha256(plan),
        operating_point=plan.operating_point,
    )


def _model_dataset_sha256(plan: RunPlan) -> str | None:
    """The dataset hash the model's metrics.json records, for the manifest's lineage.

    Why tolerant: the manifest is written last, after the rows; a version registered before
    lineage existed (or an unreadable metrics.json) must not fail a run that tagged its rows.
    """
    vdir = registry.version_uri(plan.params.get("home"), plan.model_version)
    uri = join(vdir, registry.METRICS_FILE)
    try:
        return dataset_sha256_of(read_json(uri))
    except (OSError, ValueError):
        return None


def _stage_seconds(results: Iterable[ShardResult]) -> dict[str, float]:
    keys = ("prepare_s", "model_s", "write_s", "head_start_s")
    return {f"sum_{k}": round(sum(r.seconds.get(k, 0.0) for r in results), 3) for k in keys}


def write_manifest(summary: TagSummary) -> str:
    """Write `_manifests/<run-id>.json` (exclusive: a run id is written once); returns its URI.

    A manifest already there with this run's id is this run's own earlier write (a retried
    task whose answer was lost): success, and the stored one is kept.
    """
    try:
        write_json_atomic(summary.manifest_uri, summary.to_dict(), exclusive=True)
    except FileExistsError:
        if read_json(summary.manifest_uri).get("run_id") != summary.run_id:
            raise
    return summary.manifest_uri
