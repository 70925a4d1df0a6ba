"""Bulk tagging on local folders: listing, batched scoring, Parquet shards, exactly-once, drift."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from multitag import registry, tagging
from multitag.config import TagParams
from multitag.inference import loading
from multitag.inference import tagger as tg
from multitag.inference.spec import InferenceSpec
from multitag.storage import remove_stale_temp_files
from multitag.tagging import (
    DriftRule,
    ModelBaseline,
    ShardSpec,
    Tagger,
    claims,
    compute_drift,
    list_images,
    plan_run,
    shards,
    tag_shard,
    validate_tags_table,
)
from tests.tag_runs import read_summary, run_tag_flow
from tests.tagging_helpers import (
    TinyModel,
    hostile_files,
    read_tags,
    register_tiny_model,
    write_images,
)

REPO = Path(__file__).resolve().parents[2]
# Tests that run the tag flow (the one shard runner) need the session's Prefect server.
uses_flow = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-model")
    return register_tiny_model(root / "home", root / "work")


@pytest.fixture(scope="module")
def tagger(tiny: TinyModel) -> Tagger:
    return loading.load_tagger(
        TagParams(source="-", home=str(tiny.home), batch_size=8, decode_workers=1)
    )


def params_for(tiny: TinyModel, source: Path, out: Path, **kw: object) -> TagParams:
    defaults: dict[str, object] = {
        "home": str(tiny.home),
        "out": str(out),
        "shard_size": 10,
        "batch_size": 8,
        "decode_workers": 1,
    }
    return TagParams(source=str(source), **{**defaults, **kw})


def part_files(partition: str | Path) -> list[Path]:
    return sorted(Path(partition).glob("part-*.parquet"))


# ------------------------------------------------------------------------------ sources


def test_list_images_is_recursive_sorted_case_insensitive_and_absolute(tmp_path: Path) -> None:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    for name in ["b/deep/z.JPG", "a.png", "b/c.jpeg", "notes.txt", "b/x.parquet", "b/y.WebP"]:
        (tmp_path / name).write_bytes(b"x")
    found = list(list_images(str(tmp_path)))
    expected = sorted(str(tmp_path / n) for n in ["b/deep/z.JPG", "a.png", "b/c.jpeg", "b/y.WebP"])
    assert found == expected
    assert all(os.path.isabs(p) for p in found)
    assert list(list_images(f"file://{tmp_path}")) == expected


def test_list_images_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        list_images(str(tmp_path / "nope"))


def test_default_dataset_name() -> None:
    assert tagging.default_dataset_name("s3://bucket/photos/2024/") == "2024"
    assert tagging.default_dataset_name("s3://bucket") == "bucket"
    assert tagging.default_dataset_name("/data/My Photos") == "My_Photos"


def test_read_many_takes_names_literally_and_reports_missing_files(tmp_path: Path) -> None:
    odd = tmp_path / "img[1]*.jpg"  # glob characters must not be expanded
    odd.write_bytes(b"abc")
    out = tg.read_many([str(odd), str(tmp_path / "gone.jpg")])
    assert out[0] == b"abc"
    assert isinstance(out[1], FileNotFoundError)


# ------------------------------------------------------------------ model input + scoring


def test_inference_spec_from_learner_matches_the_registered_spec(tiny: TinyModel) -> None:
    from multitag.registry import load_model

    loaded = load_model(str(tiny.home))
    from_json = InferenceSpec.from_dict(loaded.inference)
    from_learner = InferenceSpec.from_learner(loaded.learner)
    assert from_learner.img_size == from_json.img_size
    assert from_learner.resize_method == from_json.resize_method == "squish"
    assert from_learner.vocab == from_json.vocab
    assert np.allclose(from_learner.mean, from_json.mean)
    assert np.allclose(from_learner.std, from_json.std)


def test_inference_spec_requires_the_resize_method() -> None:
    with pytest.raises(tagging.TaggingError, match="resize_method"):
        InferenceSpec.from_dict(
            {"img_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1], "vocab": ["a"]}
        )


def test_scores_match_fastai_predictions(tiny: TinyModel, tagger: Tagger, tmp_path: Path) -> None:
    """Same model, same preprocessing: our batched scorer agrees with fastai's own pipeline."""
    from multitag.registry import load_model
    from multitag.training import learner

    files = write_images(tmp_path / "imgs", 12, seed=3)
    rows = [r for batch in tagger.tag([str(f) for f in files]) for r in batch.rows]
    ours = np.array([[r.scores[lab] for lab in tagger.vocab] for r in rows])  # type: ignore[index]
    theirs = learner.predict_files(load_model(str(tiny.home)).learner, files)
    assert np.allclose(ours, theirs, atol=1e-5), np.abs(ours - theirs).max()


def test_rows_come_back_in_order_with_several_decode_threads(
    tiny: TinyModel, tmp_path: Path
) -> None:
    files = [str(f) for f in write_images(tmp_path, 23)]
    t = loading.load_tagger(
        TagParams(source="-", home=str(tiny.home), batch_size=3, decode_workers=3)
    )
    batches = list(t.tag(files))
    assert [len(b.rows) for b in batches] == [3] * 7 + [2]
    assert [r.image_uri for b in batches for r in b.rows] == files


def test_labels_follow_thresholds_and_scores(tagger: Tagger, tmp_path: Path) -> None:
    files = [str(f) for f in write_images(tmp_path, 16, seed=5)]
    thr = dict(zip(tagger.vocab, tagger.thresholds.as_array(), strict=True))
    for row in (r for b in tagger.tag(files) for r in b.rows):
        assert row.scores is not None and row.labels is not None
        assert row.labels == sorted(
            (k for k, v in row.scores.items() if v > thr[k]), key=lambda k: -row.scores[k]
        )  # type: ignore[index]
        assert row.top_score == max(row.scores.values())  # the same floats: exact


# ------------------------------------------------------------------------ end to end


@uses_flow
def test_hostile_folder_every_file_tagged_or_an_error_row(tiny: TinyModel, tmp_path: Path) -> None:
    src = tmp_path / "hostile"
    src.mkdir()
    files = hostile_files()
    for name, (data, _) in files.items():
        (src / name).write_bytes(data)
    (src / "readme.txt").write_text("not listed: not an image extension")

    summary = run_tag_flow(params_for(tiny, src, tmp_path / "out"))

    table = read_tags(summary.output_uri)
    assert sorted(table.column("image_uri").to_pylist()) == sorted(str(src / n) for n in files)
    rows = {Path(r["image_uri"]).name: r for r in table.to_pylist()}
    for name, (_, kind) in files.items():
        row = rows[name]
        if kind is None:
            assert row["error"] is None, (name, row["error"])
            assert row["scores"] is not None and row["width"] > 0
        else:
            assert row["error"].startswith(f"{kind}: "), (name, row["error"])
            assert row["labels"] is None and row["scores"] is None
    assert (rows["exif_rotated.jpg"]["width"], rows["exif_rotated.jpg"]["height"]) == (60, 80)
    assert (rows["good.jpg"]["width"], rows["good.jpg"]["height"]) == (80, 60)
    assert summary.failed == 4 and summary.tagged == len(files) - 4
    assert summary.error_kinds == {"truncated": 1, "empty": 1, "unrecognised": 1, "too_large": 1}
    contract = yaml.safe_load((REPO / "data_contracts" / "tags_output.yaml").read_text())
    error_prop = next(p for p in contract["schema"][0]["properties"] if p["name"] == "error")
    pattern = re.compile(error_prop["logicalTypeOptions"]["pattern"])
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    assert len(errors) == 4 and all(pattern.fullmatch(e) for e in errors), errors
    assert validate_tags_table(table, model_version=tiny.version) == []


@uses_flow
def test_output_is_readable_by_duckdb_with_the_model_partition(
    tiny: TinyModel, tmp_path: Path
) -> None:
    import duckdb

    write_images(tmp_path / "src", 25)
    summary = run_tag_flow(params_for(tiny, tmp_path / "src", tmp_path / "out"))
    pattern = str(Path(summary.output_uri).parent / "model=*" / "*.parquet")
    ((n, models, n_labels),) = duckdb.sql(
        f"SELECT count(*), count(DISTINCT model), sum(len(labels)) "
        f"FROM read_parquet('{pattern}', hive_partitioning=true)"
    ).fetchall()
    assert (n, models) == (25, 1)
    assert n_labels == sum(sum(r.label_counts.values()) for r in summary.shards)


@uses_flow
def test_parquet_schema_matches_the_data_contract(tiny: TinyModel, tmp_path: Path) -> None:
    contract = yaml.safe_load((REPO / "data_contracts" / "tags_output.yaml").read_text())
    props = contract["schema"][0]["properties"]
    write_images(tmp_path / "src", 3)
    summary = run_tag_flow(params_for(tiny, tmp_path / "src", tmp_path / "out"))
    schema = pq.read_schema(part_files(summary.output_uri)[0])
    assert [p["name"] for p in props] == schema.names
    for prop in props:
        f = schema.field(prop["name"])
        assert type_name(f.type) == prop["physicalType"], prop["name"]
        assert f.nullable is not bool(prop.get("required")), prop["name"]
    assert schema.metadata[b"multitag.contract"] == f"tags_output {contract['version']}".encode()


def type_name(t: pa.DataType) -> str:
    """Arrow type as the contract spells it (child field names vary between writers)."""
    if pa.types.is_map(t):
        return f"map<{type_name(t.key_type)}, {type_name(t.item_type)}>"
    if pa.types.is_list(t):
        return f"list<{type_name(t.value_type)}>"
    return str(t)


@uses_flow
def test_rerun_skips_everything_then_tags_only_new_images(tiny: TinyModel, tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src, 25)
    first = run_tag_flow(params_for(tiny, src, out))
    assert (first.tagged, first.skipped, first.shards_written) == (25, 0, 3)

    again = run_tag_flow(params_for(tiny, src, out))
    assert (again.listed, again.tagged, again.skipped, again.shards_written) == (25, 0, 25, 0)

    write_images(src / "later", 7, seed=9)
    grown = run_tag_flow(params_for(tiny, src, out))
    assert (grown.listed, grown.tagged, grown.skipped) == (32, 7, 25)

    table = read_tags(grown.output_uri)
    assert table.num_rows == 32 and validate_tags_table(table) == []
    manifests = [json.loads(m.read_text()) for m in (out / "src" / "_manifests").glob("*.json")]
    manifests.sort(key=lambda m: m["started_at"])
    assert [m["tagged"] for m in manifests] == [25, 0, 7]


@uses_flow
def test_model_version_writes_its_own_partition(tiny: TinyModel, tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src, 12)
    champion = run_tag_flow(params_for(tiny, src, out))
    other = tiny.register_copy(f"copy-{os.getpid()}")
    second = run_tag_flow(params_for(tiny, src, out, model=other))
    assert second.tagged == 12 and second.skipped == 0  # a different partition: all new
    assert champion.output_uri != second.output_uri
    assert second.output_uri.endswith(f"model={other}")
    assert set(read_tags(second.output_uri).column("model_version").to_pylist()) == {other}


@uses_flow
def test_unknown_model_version_is_a_clear_error(tiny: TinyModel, tmp_path: Path) -> None:
    from multitag.registry import VersionNotFoundError

    write_images(tmp_path / "src", 2)
    with pytest.raises(VersionNotFoundError, match="models list"):
        run_tag_flow(params_for(tiny, tmp_path / "src", tmp_path / "out", model="nope"))


@uses_flow
def test_manifest_records_counts_shards_timings_and_drift(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_images(tmp_path / "src", 15)
    monkeypatch.setattr(tagging, "new_run_id", lambda: "run-1")  # the flow names its run
    summary = run_tag_flow(params_for(tiny, tmp_path / "src", tmp_path / "out"))
    manifest = json.loads(Path(summary.manifest_uri).read_text())
    assert Path(summary.manifest_uri).name == "run-1.json"
    assert manifest["status"] == "completed" and manifest["model_version"] == tiny.version
    assert (manifest["listed"], manifest["tagged"], manifest["failed"]) == (15, 15, 0)
    assert [s["status"] for s in manifest["shards"]] == ["written", "written"]
    assert {"plan_s", "tag_s", "total_s", "sum_prepare_s", "sum_model_s"} <= set(
        manifest["seconds"]
    )
    drift = manifest["drift"]
    assert drift["baseline_available"] is True
    assert [e["label"] for e in drift["labels"]] == list(tiny.inference["vocab"])
    assert drift["labels"][0]["train_rate"] == pytest.approx(
        tiny.metrics["train_label_prevalence"][tiny.inference["vocab"][0]]
    )
    counts = sum(e["count"] for e in drift["labels"]) + drift["none"]["count"]
    assert counts >= 15  # each image has at least one label or counts as "none"


@uses_flow
def test_progress_reports_reach_the_total(tiny: TinyModel, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.tag import tag_images

    write_images(tmp_path / "src", 21)
    params = params_for(tiny, tmp_path / "src", tmp_path / "out", max_concurrency=2)
    state = tag_images(**params.model_dump(), return_state=True)
    assert state.is_completed(), state.message
    summary = read_summary(state.result()["manifest"])
    # The progress artifact (what the UI shows) reached 100% of the images...
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    (progress,) = [a for a in arts if a.key == "tagging-progress-src"]  # key per dataset
    assert float(progress.data) == 100.0  # type: ignore[arg-type]
    # ... counted over every planned shard: 21 images in 3 shards, all done.
    assert sum(r.n_images for r in summary.shards) == summary.tagged == 21
    assert [r.status for r in summary.shards] == ["written"] * 3
    assert len(part_files(summary.output_uri)) == 3


# ---------------------------------------------------------------------- exactly once


@uses_flow
def test_two_runs_at_once_in_threads_tag_each_image_once(tiny: TinyModel, tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src, 60)
    params = params_for(tiny, src, out, shard_size=5)
    results: list[tagging.TagSummary] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        results.append(run_tag_flow(params))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table = read_tags(results[0].output_uri)
    assert table.num_rows == 60 and validate_tags_table(table) == []
    assert sum(r.tagged for r in results) == 60


def test_racing_planners_never_claim_an_image_twice(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B lists before A's claim lands, and sees more images: B must lose epoch 1 and claim
    only what A did not."""
    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src, 20)
    a = plan_run(params_for(tiny, src, out), run_id="A")
    write_images(src / "new", 5, seed=2)
    real = claims._list_epochs
    monkeypatch.setattr(claims, "_list_epochs", lambda plans: [])  # B's stale view
    monkeypatch.setattr(claims.ClaimLog, "absorb", _counting_absorb(real))
    b = plan_run(params_for(tiny, src, out), run_id="B")

    assert a.epoch == 1 and b.epoch == 2
    a_uris = {u for s in a.shards for u in s.uris}
    b_own = {u for s in b.shards if s.planned_by == "B" for u in s.uris}
    assert len(a_uris) == 20 and len(b_own) == 5 and not (a_uris & b_own)
    # B also picked up A's unfinished shards, in reverse order
    resumed = [s.shard_id for s in b.shards if s.planned_by == "A"]
    assert resumed == sorted((s.shard_id for s in a.shards), reverse=True)


def _counting_absorb(real_list_epochs):  # type: ignore[no-untyped-def]
    original = claims.ClaimLog.absorb

    def absorb(self, plans, epoch):  # type: ignore[no-untyped-def]
        assert epoch in real_list_epochs(plans)
        return original(self, plans, epoch)

    return absorb


def test_a_shard_finished_by_another_run_is_not_written_twice(
    tagger: Tagger, tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_images(tmp_path / "src", 6)
    plan = plan_run(params_for(tiny, tmp_path / "src", tmp_path / "out"))
    spec = plan.shards[0]
    first = tag_shard(spec, tagger)
    before = Path(spec.part_uri).read_bytes()
    assert tag_shard(spec, tagger).status == "exists"
    monkeypatch.setattr(shards, "_fresh_exists", lambda uri: False)  # raced past the check
    late = tag_shard(spec, tagger)
    assert (first.status, late.status) == ("written", "lost_race")
    assert Path(spec.part_uri).read_bytes() == before
    assert [p.name for p in Path(spec.part_uri).parent.iterdir()] == [Path(spec.part_uri).name]


NO_RETRY_WAIT = [0.0, 0.0, 0.0]  # the default's three retries, without its 5-120 s backoff


@uses_flow
def test_failed_shard_writes_a_failed_manifest_and_rerun_finishes(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network goes for good after the first shard: the second shard fails after its
    retries, no further shard starts, and the run ends failed with its manifest written."""
    from flows.tag import ShardsFailedError

    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src, 30)
    real = tg.read_many
    calls = {"n": 0}

    def flaky(uris, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] >= 3:
            raise ConnectionError("simulated network failure")
        return real(uris, **kw)

    monkeypatch.setattr(tg, "read_many", flaky)
    with pytest.raises(ShardsFailedError, match="ConnectionError: simulated") as failed:
        run_tag_flow(params_for(tiny, src, out, batch_size=5, shard_retry_delays_s=NO_RETRY_WAIT))
    assert isinstance(failed.value.__cause__, ConnectionError)
    assert calls["n"] == 2 + 1 + len(NO_RETRY_WAIT)  # shard 2's tries; shard 3 never ran
    manifest = json.loads(next((out / "src" / "_manifests").glob("*.json")).read_text())
    assert manifest["status"] == "failed" and "simulated" in manifest["error"]
    assert manifest["tagged"] == 10  # the first shard (two batches) was written

    monkeypatch.setattr(tg, "read_many", real)
    rerun = run_tag_flow(params_for(tiny, src, out))
    assert (rerun.tagged, rerun.skipped, rerun.resumed) == (20, 10, 20)
    assert read_tags(rerun.output_uri).num_rows == 30


@uses_flow
def test_a_transient_read_failure_is_retried_within_the_run(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src, 30)
    real = tg.read_many
    calls = {"n": 0}

    def flaky(uris, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:  # one batch read of the second shard meets a reset connection
            raise ConnectionResetError("simulated reset")
        return real(uris, **kw)

    monkeypatch.setattr(tg, "read_many", flaky)
    summary = run_tag_flow(
        params_for(tiny, src, out, batch_size=5, shard_retry_delays_s=NO_RETRY_WAIT)
    )
    assert (summary.status, summary.tagged, summary.failed) == ("completed", 30, 0)
    assert calls["n"] == 7  # 6 batches, one read twice: the shard's retry, not an error row
    table = read_tags(summary.output_uri)
    assert table.num_rows == 30 and table.column("error").null_count == 30


@uses_flow
def test_a_hung_read_is_cut_by_the_shard_timeout_and_the_shard_retried(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src, 20)
    real = tg.read_many
    release = threading.Event()
    calls = {"n": 0}

    def hangs_once(uris, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            release.wait(120)  # a read that never answers (until the test ends)
        return real(uris, **kw)

    monkeypatch.setattr(tg, "read_many", hangs_once)
    t0 = time.monotonic()
    try:
        summary = run_tag_flow(
            params_for(
                tiny, src, out, batch_size=5, shard_timeout_s=2, shard_retry_delays_s=NO_RETRY_WAIT
            )
        )
    finally:
        release.set()
    assert time.monotonic() - t0 < 60
    assert (summary.status, summary.tagged, summary.failed) == ("completed", 20, 0)
    assert read_tags(summary.output_uri).num_rows == 20


def test_only_weather_is_retried() -> None:
    from prefect.states import Completed, Failed

    from flows.tag import ShardsFailedError
    from multitag.inference.faults import NotRegularFileError, TransientReadError
    from multitag.registry import IntegrityError
    from tasks.tagging import _retry_weather

    def retried(exc: BaseException) -> bool:
        return _retry_weather(None, None, Failed(data=exc))

    weather = [
        ConnectionResetError("reset"),
        TimeoutError("read timed out"),
        PermissionError("The provided token has expired."),  # s3fs's ExpiredToken
        OSError("503 SlowDown"),
    ]
    weather.append(TransientReadError("token expired", uri="s3://b/k.jpg", code="ExpiredToken"))
    assert all(retried(e) for e in weather), [e for e in weather if not retried(e)]
    mistakes = [
        tagging.TaggingError("shard belongs to model v1 but the tagger holds v2"),
        IntegrityError("sha256 mismatch"),
        ValueError("a bug"),
        ShardsFailedError("x"),
        NotRegularFileError("a FIFO"),  # a fact about the image (an OSError), not weather
    ]
    assert not any(retried(e) for e in mistakes)
    assert not _retry_weather(None, None, Completed(data=1))


def test_image_deleted_after_listing_becomes_a_missing_row(
    tagger: Tagger, tiny: TinyModel, tmp_path: Path
) -> None:
    files = write_images(tmp_path / "src", 4)
    plan = plan_run(params_for(tiny, tmp_path / "src", tmp_path / "out"))
    files[1].unlink()
    result = tag_shard(plan.shards[0], tagger)
    assert (result.n_tagged, result.n_failed, result.error_kinds) == (3, 1, {"missing": 1})
    table = pq.read_table(plan.shards[0].part_uri)
    assert table.column("error").to_pylist()[1].startswith("missing: ")


def test_shard_spec_is_a_small_picklable_reference(tiny: TinyModel, tmp_path: Path) -> None:
    import pickle

    write_images(tmp_path / "src", 12)
    plan = plan_run(params_for(tiny, tmp_path / "src", tmp_path / "out"))
    spec = plan.shards[0]
    assert isinstance(spec, ShardSpec) and len(spec.uris) == 10
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert len(pickle.dumps(spec)) < 2000


@uses_flow
def test_empty_folder_is_a_run_with_nothing_to_do(tiny: TinyModel, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("no images here")
    summary = run_tag_flow(params_for(tiny, tmp_path / "src", tmp_path / "out"))
    assert (summary.listed, summary.tagged, summary.shards_written) == (0, 0, 0)
    assert Path(summary.manifest_uri).is_file()
    assert "listed 0" in summary.format_text()


def test_summary_folds_shard_results_and_reports_drift(tmp_path: Path) -> None:
    base = ModelBaseline(("cat", "dog"), {"cat": 0.5, "dog": 0.5}, 0.1)
    params = TagParams(source=str(tmp_path), out=str(tmp_path / "out"), shard_size=100)
    tmp_path.mkdir(exist_ok=True)
    plan = plan_run(params, model_version="v9", baseline=base, run_id="r1")
    results = [
        tagging.ShardResult(
            "000001-000000",
            "p0",
            "written",
            100,
            n_tagged=98,
            n_failed=2,
            n_none=10,
            label_counts={"cat": 88},
            error_kinds={"truncated": 2},
            seconds={"prepare_s": 1.0, "model_s": 2.0, "write_s": 0.5},
        ),
        tagging.ShardResult(
            "000001-000001",
            "p1",
            "written",
            50,
            n_tagged=50,
            n_none=0,
            label_counts={"cat": 50, "dog": 1},
        ),
        tagging.ShardResult("000001-000002", "p2", "lost_race", 40),
        tagging.ShardResult("000001-000003", "p3", "exists", 30),
    ]
    summary = tagging.summarize_run(plan, results, tag_s=2.0)
    assert (summary.tagged, summary.failed, summary.skipped) == (148, 2, 70)
    assert (summary.shards_written, summary.shards_skipped) == (2, 2)
    assert summary.images_per_s == 75.0
    assert summary.error_kinds == {"truncated": 2}
    assert summary.seconds["sum_model_s"] == 2.0
    # cat 0.5 -> 0.93 (absence 0.5 -> 0.07), dog 0.5 -> 0.01; none 0.1 -> 0.07 is too small
    assert summary.drift.flagged == ["cat", "dog"]
    text = summary.format_text()
    assert "DRIFT: cat 0.93 vs 0.50 in training; dog 0.01 vs 0.50" in text
    assert "failed 2" in text
    json.dumps(summary.to_dict())  # the manifest must be JSON


# ---------------------------------------------------------------------------- drift


def test_drift_flags_only_big_relative_and_absolute_moves() -> None:
    base = ModelBaseline(("a", "b", "c", "d"), {"a": 0.5, "b": 0.02, "c": 0.6, "d": 0.0}, 0.1)
    counts = {"a": 10, "b": 5, "c": 75, "d": 30, "e": 3}  # of 100 images
    report = compute_drift(counts, n_none=40, n_images=100, baseline=base)
    rates = {e.label: e for e in report.labels}
    assert rates["a"].flagged  # 0.5 -> 0.1: ratio 0.2, diff 0.4
    assert not rates["b"].flagged  # 0.02 -> 0.05: ratio 2.5 but diff 0.03
    assert not rates["c"].flagged  # 0.6 -> 0.75: diff 0.15 but ratios 1.25 and 0.625
    assert DriftRule().flags(0.9, 0.6, 100)  # absence 0.4 -> 0.1
    assert rates["d"].flagged  # never seen in training, now 30%
    assert not rates["e"].flagged and rates["e"].train_rate is None  # not in the vocab
    assert report.none.flagged and report.none.rate == 0.4  # 0.1 -> 0.4
    assert report.flagged == ["a", "d", "(none)"]


def test_drift_needs_enough_images_and_a_baseline() -> None:
    base = ModelBaseline(("a",), {"a": 0.5}, 0.1)
    few = compute_drift({"a": 0}, 9, 9, base, DriftRule(min_images=10))
    assert few.flagged == [] and "too few" in few.note
    none = compute_drift({"a": 0}, 500, 500, ModelBaseline(("a",)))
    assert none.flagged == [] and not none.baseline_available
    assert "no train_label_prevalence" in none.note


# ------------------------------------------------------------------------ temp files


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    host = socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f".tmp-{int(dead.stdout)}-{host}-abc123"
    live = tmp_path / f".tmp-{os.getpid()}-{host}-def456"
    other_host = tmp_path / ".tmp-1-elsewhere-ghi789"
    for f in (stale, live, other_host):
        f.write_bytes(b"partial")
    assert remove_stale_temp_files(str(tmp_path)) == [str(stale)]
    assert live.exists() and other_host.exists()
    os.utime(other_host, (0, 0))  # a day old: its writer is long gone, wherever it ran
    assert remove_stale_temp_files(str(tmp_path)) == [str(other_host)]
    from multitag import storage

    assert storage.temp_prefix() == f".tmp-{os.getpid()}-{host}-"  # what writers leave behind


def test_rows_to_table_nulls_on_error() -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    rows = [
        tagging.TagRow("a.jpg", ["x"], {"x": 0.9, "y": 0.1}, "x", 0.9, 10, 20, now),
        tagging.TagRow("b.jpg", None, None, None, None, None, None, now, "empty: file has 0 bytes"),
    ]
    table = tagging.rows_to_table(rows, "v1")
    assert table.schema.equals(tagging.tags_schema())
    assert table.column("scores").type == pa.map_(pa.string(), pa.float32())
    assert table.column("labels").to_pylist() == [["x"], None]
    assert validate_tags_table(table) == []
    broken = table.set_column(1, "labels", pa.array([["y", "x"], ["x"]], pa.list_(pa.string())))
    problems = validate_tags_table(broken)
    assert any(p.startswith("labels_above_threshold_by_score: a.jpg") for p in problems)
    assert any(p.startswith("error_xor_result: b.jpg") for p in problems)


def test_prefetch_loads_the_runs_tagger_once_and_defers_failures(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str | None] = []
    real = loading.load_tagger

    def counting(params: TagParams, version: str | None = None) -> Tagger:
        calls.append(version)
        return real(params, version)

    monkeypatch.setattr(loading, "load_tagger", counting)
    loading._cached_tagger.cache_clear()
    params = params_for(tiny, tmp_path / "src", tmp_path / "out", precision="fp32")
    assert tagging.prefetch_tagger(params) == tiny.version
    first = tagging.tagger_for(params, tiny.version)  # what the shard task calls: cached
    assert calls == [tiny.version] and first.model_version == tiny.version
    # No champion: nothing raised and nothing cached; the run reports it itself.
    empty = params.model_copy(update={"home": str(tmp_path / "empty-home")})
    assert tagging.prefetch_tagger(empty) is None
    with pytest.raises(registry.NoChampionError):
        tagging.resolve_model_version(empty)
    assert calls == [tiny.version]
    loading._cached_tagger.cache_clear()


# Scores of one image computed in different batches agree to float32 rounding, not bit for
# bit: oneDNN's kernels sum in an order that depends on the batch (its size and blocking), so
# the same image scored in a head-start batch of 16 and in a shard's batch of 8 differs in
# the last bits on some CPUs (AMD Zen 4: ~1e-7), agrees on others. 1e-5 leaves room for
# deeper models; a different image or model moves scores by 1e-2 and more.
SCORE_ATOL = 1e-5


def assert_same_tags(got: pa.Table, want: pa.Table, thresholds: dict[str, float]) -> None:
    """One row per image in both, for the same images, with the same errors, sizes, labels
    and top label, and scores within SCORE_ATOL. A label (or top label) may differ only
    where its score lies within SCORE_ATOL of its threshold (or of the runner-up score)."""
    rows = {r["image_uri"]: r for r in got.to_pylist()}
    ref = {r["image_uri"]: r for r in want.to_pylist()}
    assert len(rows) == got.num_rows and len(ref) == want.num_rows  # one row per image
    assert sorted(rows) == sorted(ref)
    for uri, r in rows.items():
        w = ref[uri]
        same = ("error", "width", "height", "model_version")
        assert {k: r[k] for k in same} == {k: w[k] for k in same}, uri
        if w["error"] is not None:
            assert r["scores"] is r["labels"] is None, uri
            continue
        a, b = dict(r["scores"]), dict(w["scores"])
        assert sorted(a) == sorted(b), uri
        assert all(abs(a[k] - b[k]) <= SCORE_ATOL for k in a), (uri, a, b)
        assert abs(r["top_score"] - w["top_score"]) <= SCORE_ATOL, uri
        near = {k for k in a if abs(b[k] - thresholds[k]) <= SCORE_ATOL}
        assert set(r["labels"]) - near == set(w["labels"]) - near, uri
        top2 = sorted(b.values())[-2:]
        if len(top2) < 2 or top2[1] - top2[0] > SCORE_ATOL:
            assert r["top_label"] == w["top_label"], uri


@uses_flow
def test_a_head_start_tags_the_first_shard_early_and_that_shard_writes_its_rows(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multitag.tagging import headstart

    src, out, plain_out = tmp_path / "src", tmp_path / "out", tmp_path / "plain"
    write_images(src, 25)
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # an error row, from either path
    loading._cached_tagger.cache_clear()
    params = params_for(tiny, src, out, precision="fp32")
    assert tagging.prefetch_tagger(params, head_start=True) == tiny.version
    tagger = tagging.tagger_for(params, tiny.version)
    head = headstart._started[id(tagger)]
    head._thread.join(timeout=120)  # let it finish: its 10 images (the first shard's)
    expected = tagging.first_shard_uris(params, tiny.version)
    assert expected == sorted(str(p) for p in src.iterdir())[:10] and len(head._rows) == 10
    # Nothing is written until the run claims the images and its shard writes them.
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("*.arrow"))

    sharded: list[tuple[int, int]] = []
    real_tag = Tagger.tag

    def recording_tag(self: Tagger, uris, **kw):  # type: ignore[no-untyped-def]
        sharded.append((len(uris), len(set(uris) & set(expected))))
        return real_tag(self, uris, **kw)

    monkeypatch.setattr(Tagger, "tag", recording_tag)
    summary = run_tag_flow(params)
    assert (summary.tagged + summary.failed, summary.shards_written) == (26, 3)
    assert sharded[0] == (0, 0)  # the first shard scored nothing itself
    assert [s["n_head_start"] for s in summary.to_dict()["shards"]] == [10, 0, 0]
    assert ["exact" in s for s in summary.to_dict()["scorers"]] == [True]  # precision fp32
    assert summary.seconds["sum_head_start_s"] > 0 and id(tagger) not in headstart._started
    # The same rows, each image once, as a run without a head start writes (its batches
    # differ, so scores agree to rounding: see SCORE_ATOL).
    plain = run_tag_flow(params.model_copy(update={"out": str(plain_out)}))
    assert plain.shards_written == 3 and sum(s.n_head_start for s in plain.shards) == 0
    thresholds = dict(zip(tagger.vocab, tagger.thresholds.as_array().tolist(), strict=True))
    assert_same_tags(read_tags(summary.output_uri), read_tags(plain.output_uri), thresholds)
    loading._cached_tagger.cache_clear()


def test_a_head_start_skips_claimed_images_and_hands_each_row_to_its_shard_once(
    tiny: TinyModel, tagger: Tagger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multitag.tagging import headstart

    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src, 12)
    params = params_for(tiny, src, out, shard_size=5)
    plan_run(params)  # an earlier (killed) run claimed all 12 and wrote nothing
    write_images(src / "new", 3, seed=5)
    assert tagging.first_shard_uris(params, tiny.version) == sorted(
        str(p) for p in (src / "new").iterdir()
    )
    # Rows of images the shard does not hold are dropped; a failing head start costs nothing.
    everything = sorted(str(p) for p in src.rglob("*.jpg"))
    head = headstart.start(tagger, lambda: everything)
    head._thread.join(timeout=120)
    spec = plan_run(params).shards[0]  # this run's own shard: the 3 new images
    ready, seconds = headstart.take(tagger, spec.uris)
    assert set(ready) == set(spec.uris) and 0 < seconds < head.seconds
    assert headstart.take(tagger, spec.uris) == ({}, 0.0)  # each row is handed over once
    # the other rows wait for the shard that holds them (shards may start in any order)
    rest, rest_s = headstart.take(tagger, everything)
    assert set(rest) | set(ready) == set(everything)
    assert rest_s + seconds == pytest.approx(head.seconds)
    assert id(tagger) not in headstart._started  # exhausted: forgotten

    def broken() -> list[str]:
        raise OSError("listing failed")

    headstart.start(tagger, broken)
    result = tag_shard(spec, tagger)
    assert (result.status, result.n_images, result.n_head_start) == ("written", 3, 0)


def test_a_head_start_stops_between_small_batches_when_its_shard_takes_over(
    tagger: Tagger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multitag.tagging import headstart

    write_images(tmp_path, 64)
    uris = sorted(str(p) for p in tmp_path.iterdir())
    gate = threading.Event()
    real = Tagger.tag_batch

    def slow(self: Tagger, batch):  # type: ignore[no-untyped-def]
        gate.wait(timeout=60)  # the shard arrives while the first batch is in progress
        return real(self, batch)

    monkeypatch.setattr(Tagger, "tag_batch", slow)
    head = headstart.start(tagger, lambda: uris)
    timer = threading.Timer(0.2, gate.set)
    timer.start()
    ready, _ = headstart.take(tagger, uris)
    timer.join()
    assert len(ready) == headstart.BATCH  # the batch in progress, then it stopped
    assert not head._thread.is_alive()
