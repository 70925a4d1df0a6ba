"""Events the flows emit, and the tag flow's flat parameters (issue 18, items 1 and 2).

Events are captured with Prefect's own `AssertingEventsClient` (what Prefect's test
fixture `asserting_events_worker` installs): `emit_event` builds and validates the real
`Event`, and the worker hands it to that client instead of a server's websocket. The
e2e test (tests/e2e/test_deployments.py) reads them back from a real server.
"""

from __future__ import annotations

import inspect
import logging
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from multitag import registry
from multitag.config import TagParams
from multitag.errors import InputError
from multitag.training.thresholds import ThresholdSet
from tasks import events

# The session's Prefect server for the whole module: the flow tests need it, and Prefect's
# console log handler must be set up by `prefect_harness` (tests/conftest.py), not by the
# first test that imports `flows.tag`.
pytestmark = pytest.mark.usefixtures("prefect_harness")

VOCAB = ["circle", "square", "star"]


# ---------------------------------------------------------------------------------------------
# Flat parameters of tag-images


def test_tag_images_signature_mirrors_tag_params() -> None:
    """One flow parameter per TagParams field, same name, order and default: a field added
    to TagParams without its flow parameter (or the reverse) fails here."""
    from flows.tag import tag_images

    signature = inspect.signature(tag_images.fn)
    fields = TagParams.model_fields
    assert list(signature.parameters) == list(fields)
    for name, parameter in signature.parameters.items():
        field = fields[name]
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        if field.is_required():
            assert parameter.default is inspect.Parameter.empty, name
            continue
        default = field.get_default(call_default_factory=True)
        ours = list(parameter.default) if isinstance(default, list) else parameter.default
        assert ours == default and type(ours) is type(default), name
    hints = typing.get_type_hints(tag_images.fn)
    for name, field in fields.items():  # the same choices where the field has a fixed set
        if typing.get_origin(field.annotation) is typing.Literal:
            assert typing.get_args(hints[name]) == typing.get_args(field.annotation), name


def test_flat_parameters_build_the_same_tag_params() -> None:
    from flows.tag import tag_params

    params = TagParams(source="s3://b/p", model="shapes@v1", shard_retry_delays_s=[1.0])
    assert tag_params(**params.model_dump()) == params
    assert tag_params(source="/imgs") == TagParams(source="/imgs")


def test_a_bad_flat_parameter_is_an_input_error_naming_the_field() -> None:
    from flows.tag import tag_params

    with pytest.raises(InputError, match=r"(?s)bad tag-images parameters.*batch_size"):
        tag_params(source="/imgs", batch_size=0)
    with pytest.raises(InputError, match="mutually exclusive"):
        tag_params(source="/imgs", min_precision=0.9, thresholds_file="t.json")


def test_the_flow_parameter_schema_is_flat() -> None:
    """What a deployment stores and the UI renders: `source` required, the rest optional."""
    from prefect.utilities.callables import parameter_schema

    from flows.tag import tag_images

    schema = parameter_schema(tag_images.fn)
    assert schema.required == ["source"]
    assert set(schema.properties) == set(TagParams.model_fields)
    assert schema.properties["shard_retry_delays_s"]["default"] == [5.0, 30.0, 120.0]


# ---------------------------------------------------------------------------------------------
# Events


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The events `emit_event` sends, in order (drained after the test's emissions)."""
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    AssertingEventsClient.reset()
    worker = EventsWorker.instance(AssertingEventsClient)
    monkeypatch.setattr(EventsWorker, "instance", lambda *_: worker)
    captured: list[Any] = []
    yield captured
    worker.drain()


def drained(captured: list[Any]) -> list[Any]:
    """Wait for the worker to pass everything to the client, then return what it got."""
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    EventsWorker.instance().wait_until_empty()
    client = AssertingEventsClient.last
    assert client is not None, "no events client was started"
    captured[:] = [e for e in client.events if e.event.startswith("multitag.")]
    return captured


def related(event: Any, role: str) -> list[str]:
    return [r.id for r in event.related if r.role == role]


def test_model_events_name_the_model_and_its_dataset(sent: list[Any]) -> None:
    metrics = {"validation": {"mAP": 0.91, "f1_micro": 0.8, "n": "x"}, "history": [1, 2]}
    events.emit_model_registered("v1", "shapes", uri="/home/models/v1", metrics=metrics)
    decision = {"promoted": True, "metric": "mAP", "candidate_value": 0.91,
                "champion_value": 0.85, "champion_version": "v0", "forced": False}  # fmt: skip
    events.emit_model_promoted("v1", "shapes", decision, model_name="shapes-cnn", uri="/m/v1")
    registered, promoted = drained(sent)

    assert registered.event == "multitag.model.registered"
    assert registered.resource.id == "multitag.model.v1"
    assert registered.resource.name == "v1"
    assert related(registered, "dataset") == ["multitag.dataset.shapes"]
    assert registered.payload["metrics"] == {"mAP": 0.91, "f1_micro": 0.8}  # numbers only
    assert registered.payload["name"] == "shapes"  # no model name: the dataset's

    assert promoted.event == "multitag.model.promoted"
    assert promoted.resource.id == "multitag.model.v1"
    assert promoted.payload["version"] == "v1" and promoted.payload["name"] == "shapes-cnn"
    assert promoted.payload["champion_value"] == 0.85
    assert related(promoted, "previous-champion") == ["multitag.model.v0"]


def _summary(flagged: list[str], error: str | None = None) -> dict[str, Any]:
    def rate(label: str, r: float, t: float) -> dict[str, Any]:
        return {"label": label, "count": int(r * 100), "rate": r, "train_rate": t,
                "flagged": label in flagged}  # fmt: skip

    return {
        "run_id": "run-1", "dataset": "photos", "model_version": "v3", "source": "s3://b/photos",
        "output_uri": "s3://t/photos", "manifest_uri": "s3://t/photos/_manifests/run-1.json",
        "listed": 100, "tagged": 90, "failed": 4, "skipped": 6, "images_per_s": 12.5,
        "error": error,
        "drift": {"n_images": 90, "rule": {"min_images": 50.0}, "flagged": flagged,
                  "labels": [rate("circle", 0.6, 0.3), rate("square", 0.3, 0.3)],
                  "none": rate("(none)", 0.1, 0.1)},
    }  # fmt: skip


def test_tagging_events_come_from_the_written_manifest(sent: list[Any]) -> None:
    from tasks.tagging import _announce

    _announce(_summary(flagged=["circle"]))
    _announce(_summary(flagged=[]))  # no drift: completed only
    _announce(_summary(flagged=[], error="ConnectionError: gone"))  # a failed run: neither
    completed, drift, completed_again = drained(sent)

    assert completed.event == completed_again.event == "multitag.tagging.completed"
    assert completed.resource.id == "multitag.dataset.photos"
    assert related(completed, "model") == ["multitag.model.v3"]
    assert {k: completed.payload[k] for k in ("tagged", "failed", "skipped")} == {
        "tagged": 90, "failed": 4, "skipped": 6,
    }  # fmt: skip
    assert completed.payload["manifest_uri"].endswith("run-1.json")
    assert completed.payload["drift_flagged"] == ["circle"]

    assert drift.event == "multitag.drift.flagged"
    assert drift.resource.id == "multitag.dataset.photos"
    assert drift.payload["flagged"] == ["circle"]
    assert drift.payload["rates"] == {"circle": {"rate": 0.6, "train_rate": 0.3, "count": 60}}


def test_an_emission_failure_is_a_warning_not_an_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import prefect.events

    def broken(**_: Any) -> None:
        raise ConnectionError("events socket closed")

    monkeypatch.setattr(prefect.events, "emit_event", broken)
    with caplog.at_level(logging.WARNING, logger="tasks.events"):
        assert events.emit_model_registered("v1", "shapes") is None
    assert "multitag.model.registered" in caplog.text and "socket closed" in caplog.text


# ---------------------------------------------------------------------------------------------
# The tasks emit where the work happens (in a flow, on the session's Prefect server)


def _register(home: str, tmp_path: Path, m_ap: float) -> str:
    """A registry version with fake model bytes: the gate reads metrics and checksums only."""
    learner_file = tmp_path / f"export-{uuid.uuid4().hex[:6]}.pkl"
    learner_file.write_bytes(b"pretend pickle " + uuid.uuid4().bytes)
    ts = ThresholdSet(
        vocab=list(VOCAB),
        objective="f1",
        policy="global",
        global_threshold=0.4,
        per_label=dict.fromkeys(VOCAB, 0.4),
        support=dict.fromkeys(VOCAB, 30),
    )
    return registry.register_model(
        home,
        learner_file=learner_file,
        thresholds=ts.to_json(),
        metrics={"validation": {"mAP": m_ap}, "dataset": {"name": "shapes"}},
        inference={"img_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3, "vocab": VOCAB},
        report_files={"report.md": b"# report\n"},
    )


def test_promoted_is_emitted_only_when_the_gate_promotes(tmp_path: Path, sent: list[Any]) -> None:
    from prefect import flow

    from tasks.retrain import promote_if_better

    home = str(tmp_path / "home")
    better, worse = _register(home, tmp_path, 0.9), _register(home, tmp_path, 0.5)

    @flow
    def gate(version: str) -> dict[str, Any]:
        return promote_if_better(home, version, "mAP", False, dataset_name="shapes")

    assert gate(better)["promoted"] is True
    assert gate(worse)["promoted"] is False
    (promoted,) = drained(sent)
    assert promoted.event == "multitag.model.promoted"
    assert promoted.resource.id == f"multitag.model.{better}"
    assert promoted.payload["version"] == better
    assert related(promoted, "dataset") == ["multitag.dataset.shapes"]
    # Prefect adds the run that emitted it, so an automation can link back to it.
    assert {r.id.split(".")[1] for r in promoted.related} >= {"flow-run", "task-run"}


def test_a_promotion_by_hand_is_emitted_when_a_server_is_configured(
    tmp_path: Path, sent: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`multitag models promote` fires the same trigger as a retrain's promotion; with no
    PREFECT_API_URL there is no server to react, and nothing is sent."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    home = str(tmp_path / "home")
    first, second = _register(home, tmp_path, 0.9), _register(home, tmp_path, 0.8)
    with temporary_settings({PREFECT_API_URL: None}):
        assert main(["models", "promote", first, "--home", home]) == 0
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert main(["models", "promote", f"shapes@{second}", "--home", home]) == 0
    (promoted,) = drained(sent)
    assert promoted.event == "multitag.model.promoted"
    assert promoted.resource.id == f"multitag.model.{second}"
    assert promoted.payload["name"] == "shapes" and promoted.payload["forced"] is True
    assert related(promoted, "previous-champion") == [f"multitag.model.{first}"]


def test_a_broken_contract_is_emitted_before_the_run_fails(tmp_path: Path, sent: list[Any]) -> None:
    from prefect import flow

    from multitag.data.shapes import make_shapes_dataset
    from tasks.retrain import ContractViolationError, validate_contract

    src = make_shapes_dataset(tmp_path / "bad", n_train=20, n_test=2, img_size=16, seed=1)
    csv = src / "train.csv"
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].replace(",True", ",maybe").replace(",False", ",maybe")
    csv.write_text("\n".join(lines) + "\n")

    @flow
    def check() -> dict[str, Any]:
        return validate_contract(str(src), str(tmp_path / "reports"), dataset_name="shapes-bad")

    state = check(return_state=True)
    assert state.is_failed()
    with pytest.raises(ContractViolationError):
        state.result()
    (failed,) = drained(sent)
    assert failed.event == "multitag.contract.failed"
    assert failed.resource.id == "multitag.dataset.shapes-bad"
    assert failed.payload["n_errors"] >= 1 and failed.payload["first_error"]
    assert failed.payload["report_uri"].endswith("contract_report.csv")


def test_a_run_whose_events_cannot_be_sent_still_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prefect.events
    from prefect import flow

    from tasks.retrain import promote_if_better

    def broken(**_: Any) -> None:
        raise ConnectionError("events socket closed")

    monkeypatch.setattr(prefect.events, "emit_event", broken)
    home = str(tmp_path / "home")
    version = _register(home, tmp_path, 0.9)

    @flow
    def gate() -> dict[str, Any]:
        return promote_if_better(home, version, "mAP", False, dataset_name="shapes")

    state = gate(return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["promoted"] is True
    assert registry.list_versions(home)[0]["is_champion"]
