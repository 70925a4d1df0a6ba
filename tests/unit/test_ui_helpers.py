"""The pieces behind what the Prefect UI shows (issue 18 items 4-5), without a server.

Keys and links a person opens, the progress bars' throttling and per-batch counting, the
library's log lines routed to the run's logs, the report's training and precision-recall
plots, the fastai progress callback, and the log setting in the CLI, pools and images.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multitag.training import report_plots
from tasks import artifacts

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------- keys and links
@pytest.mark.parametrize(
    ("base", "dataset", "key"),
    [
        ("tagging-progress", "Photos_2024.v2", "tagging-progress-photos-2024-v2"),
        ("model-report", "pascal_2007", "model-report-pascal-2007"),
        ("model-report", None, "model-report"),
        ("label-rates", "--x--", "label-rates-x"),
    ],
)
def test_dataset_keys_are_valid_artifact_keys(base: str, dataset: str | None, key: str) -> None:
    got = artifacts.dataset_key(base, dataset)
    assert got == key
    assert re.fullmatch(r"[a-z0-9-]+", got) and len(got) <= 100


def test_one_key_per_dataset() -> None:
    keys = {artifacts.dataset_key("tagging-progress", d) for d in ("cats", "dogs", "Cats")}
    assert keys == {"tagging-progress-cats", "tagging-progress-dogs"}


def test_openable_urls(tmp_path: Path) -> None:
    target = tmp_path / "out" / "model=v1"
    target.mkdir(parents=True)
    url = artifacts.openable_url(str(target), folder=True)
    assert url == target.resolve().as_uri() and url.startswith("file:///")
    assert artifacts.openable_url(f"file://{target}") == url
    assert (
        artifacts.openable_url("s3://bucket/tags/ds/model=v1", folder=True)
        == "https://s3.console.aws.amazon.com/s3/buckets/bucket?prefix=tags/ds/model%3Dv1/"
    )
    assert (
        artifacts.openable_url("s3://bucket/tags/ds/_manifests/r1.json")
        == "https://s3.console.aws.amazon.com/s3/object/bucket?prefix=tags/ds/_manifests/r1.json"
    )
    assert artifacts.openable_url("gs://b/p/x.json") == (
        "https://console.cloud.google.com/storage/browser/b/p/x.json"
    )
    assert artifacts.openable_url("https://host/x") == "https://host/x"


# ------------------------------------------------------------------------- progress bars
class _Recorder:
    """Stands in for Prefect's artifact calls: what would have been sent, in order."""

    def __init__(self) -> None:
        self.sent: list[float] = []

    def create(self, progress: float, key: str, description: str) -> str:
        assert re.fullmatch(r"[a-z0-9-]+", key)
        return "artifact-id"

    def update(self, artifact_id: str, progress: float) -> None:
        assert artifact_id == "artifact-id" and 0.0 <= progress <= 100.0
        self.sent.append(progress)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    rec = _Recorder()
    monkeypatch.setattr(artifacts, "create_progress_artifact", rec.create)
    monkeypatch.setattr(artifacts, "update_progress_artifact", rec.update)
    return rec


def test_progress_is_throttled_but_forced_updates_go(
    recorder: _Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr(artifacts.time, "monotonic", lambda: clock[0])
    heard: list[tuple[str, float]] = []
    monkeypatch.setattr(artifacts, "progress_listeners", [lambda k, p: heard.append((k, p))])
    bar = artifacts.ProgressArtifact("Training Progress-ds", "d")
    assert bar.key == "training-progress-ds"
    clock[0] += artifacts.PROGRESS_INTERVAL_S
    assert bar.set(10.0)
    assert not bar.set(20.0)  # within the interval: not sent
    assert bar.set(30.0, force=True)  # an epoch's end: sent anyway
    assert not bar.set(30.0, force=True)  # unchanged: never sent
    clock[0] += artifacts.PROGRESS_INTERVAL_S
    assert bar.set(250.0)  # clamped
    assert recorder.sent == [10.0, 30.0, 100.0]
    assert heard == [("training-progress-ds", p) for p in recorder.sent]


def test_tagging_progress_counts_batches_of_shards_in_flight(
    recorder: _Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifacts, "PROGRESS_INTERVAL_S", 0.0)
    progress = artifacts.TaggingProgress("run-1", 1000, artifacts.ProgressArtifact("p", "d"))
    try:
        a, b = artifacts.batch_callback("run-1", "s0"), artifacts.batch_callback("run-1", "s1")
        assert a is not None and b is not None
        assert artifacts.batch_callback("another-run", "s0") is None  # e.g. a Dask worker
        a(64)
        a(64)
        b(64)
        assert progress.done == 192
        assert progress.publish() and recorder.sent == [19.2]
        retry = artifacts.batch_callback("run-1", "s1")  # a retried shard counts again from 0
        assert retry is not None and progress.done == 128
        progress.shard_finished("s0", 500)  # finished shards count their images
        retry(64)
        assert progress.done == 564
        progress.shard_finished("s1", 500)
        progress.shard_finished("s2", 500)  # e.g. already written: never over the total
        assert progress.done == 1000 and progress.publish() and recorder.sent[-1] == 100.0
    finally:
        progress.close()
    assert artifacts.batch_callback("run-1", "s3") is None


# ------------------------------------------------------------------------- library logs
def test_library_logs_go_where_prefect_sends_run_logs() -> None:
    import prefect.main  # noqa: F401  (configures Prefect's logging, as any flow run does)

    lib, extra = logging.getLogger("multitag"), logging.getLogger("prefect.extra")
    before, level = list(lib.handlers), lib.level
    try:
        lib.handlers.clear()
        lib.setLevel(logging.NOTSET)
        artifacts.route_library_logs()
        artifacts.route_library_logs()  # idempotent: no handler twice
        assert extra.handlers and lib.handlers == extra.handlers
        from prefect.logging.handlers import APILogHandler

        assert any(isinstance(h, APILogHandler) for h in lib.handlers)
        assert lib.getEffectiveLevel() <= logging.INFO  # INFO lines are not dropped by root
    finally:
        lib.handlers[:] = before
        lib.setLevel(level)


def test_cli_pools_and_images_set_the_extra_loggers(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import cli

    monkeypatch.delenv("PREFECT_LOGGING_EXTRA_LOGGERS", raising=False)
    monkeypatch.setattr(cli, "configure_cpu_runtime", lambda: None)
    cli._prepare_runtime()
    assert os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] == "multitag"
    for pool in sorted((REPO / "infra" / "work-pools").glob("*.json")):
        env = json.loads(pool.read_text())["variables"]["properties"]["env"]["default"]
        assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "multitag", pool.name
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (REPO / "infra" / dockerfile).read_text()
        assert re.search(r"^\s+PREFECT_LOGGING_EXTRA_LOGGERS=multitag \\$", text, re.M)


# ------------------------------------------------------------------------- report plots
def test_precision_recall_curve_properties() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.4, 0.3, 0.1])
    positives = np.array([True, True, False, True, False, False])
    precision, recall = report_plots.precision_recall_curve(scores, positives)
    # One point per distinct score (the tie at 0.8 is one threshold), highest first.
    assert len(precision) == len(recall) == 5
    assert np.all(np.diff(recall) >= 0) and recall[-1] == 1.0
    assert precision[0] == 1.0 and precision[1] == pytest.approx(2 / 3)
    assert precision[-1] == pytest.approx(3 / 6)  # every image kept: the prevalence
    perfect, _ = report_plots.precision_recall_curve([0.9, 0.8, 0.2], [True, True, False])
    assert list(perfect[:2]) == [1.0, 1.0]
    assert report_plots.precision_recall_curve([0.5, 0.4], [False, False])[0].size == 0


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_training_curves_png() -> None:
    history: list[dict[str, Any]] = [
        {"epoch": e, "train_loss": 1 / e, "valid_loss": 1.2 / e, "accuracy_multi": 0.5 + e / 10,
         "time_s": 1.0}
        for e in (1, 2, 3)
    ]  # fmt: skip
    width, height = _png_size(report_plots.plot_training_curves(history))
    assert width >= 1000 and height >= 350  # two panels: loss, metrics
    only_loss = [{"epoch": 1, "train_loss": 0.5, "valid_loss": 0.6}]
    assert _png_size(report_plots.plot_training_curves(only_loss))[0] < width
    with pytest.raises(ValueError, match="no training history"):
        report_plots.plot_training_curves([])


def test_precision_recall_png() -> None:
    rng = np.random.default_rng(0)
    targets = rng.random((40, 3)) < 0.4
    targets[:, 2] = False  # a label without positives: named, not drawn
    probs = np.clip(targets * 0.5 + rng.random((40, 3)) * 0.6, 0, 1)
    data = report_plots.plot_precision_recall(probs, targets, ["cat", "dog", "owl"])
    assert _png_size(data) == (750, 600)
    with pytest.raises(ValueError, match="must both be"):
        report_plots.plot_precision_recall(probs[:, :2], targets, ["cat", "dog", "owl"])


# ------------------------------------------------------------------------- training progress
def test_training_reports_progress_within_epochs(tmp_path: Path) -> None:
    from multitag.config import shapes_train_params
    from multitag.data.shapes import make_shapes_dataset
    from multitag.training import learner

    data = make_shapes_dataset(tmp_path / "shapes", n_train=80, n_test=0, img_size=24, seed=2)
    params = shapes_train_params(img_size=24, epochs=2, batch_size=16, num_workers=0)
    fractions: list[float] = []
    epochs: list[int] = []
    learner.train(
        data,
        params,
        on_epoch=lambda row: epochs.append(row["epoch"]),
        on_progress=fractions.append,
    )
    assert epochs == [1, 2]
    n_batches = len(fractions) // 2  # 64 training images / 16 per batch, per epoch
    assert n_batches >= 3 and len(fractions) == 2 * n_batches
    assert fractions == sorted(fractions) and 0 < fractions[0] < 0.5
    assert fractions[n_batches - 1] == pytest.approx(0.5) and fractions[-1] == 1.0
