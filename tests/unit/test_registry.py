"""Registry: immutable versions with sha256 checks, a champion gate, any fsspec root.

The unpickling step is replaced by a fake `multitag.training.learner` module (a real learner
is the training tests' business, and importing fastai would cost seconds); every sha256 check
is real.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import types
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest

from multitag import registry
from multitag.registry import (
    IncompleteVersionError,
    IntegrityError,
    NoChampionError,
    RegistryError,
    VersionExistsError,
    champion,
)
from multitag.storage import join, read_bytes, write_bytes_atomic
from multitag.training.thresholds import ThresholdSet

VOCAB = ["circle", "square", "star"]


@pytest.fixture(params=["local", "memory"])
def home(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "local":
        yield str(tmp_path / "home")
        return
    root = f"memory://registry-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MULTITAG_CACHE_DIR", str(cache))
    return cache


class FakeLoader:
    """Stands in for training.load_learner_file: records what it was asked to unpickle.

    The registry hands it the verified bytes as a file object, never a path to re-open; a
    `before_read` hook runs first (to swap the file on disk between the check and the load).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Path | None, bytes]] = []
        self.before_read: Any = None

    def __call__(self, source: Any, cpu: bool = True) -> str:
        assert hasattr(source, "read"), f"the loader was given a path to re-open: {source!r}"
        if self.before_read is not None:
            self.before_read()
        self.calls.append((None, source.read()))
        return "learner-from-model.pkl"


@pytest.fixture
def loader(monkeypatch: pytest.MonkeyPatch) -> FakeLoader:
    fake = FakeLoader()
    module = types.ModuleType("multitag.training.learner")
    module.load_learner_file = fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "multitag.training.learner", module)
    # `from multitag.training import learner` reads the package's attribute first.
    monkeypatch.setattr(sys.modules["multitag.training"], "learner", module, raising=False)
    return fake


def thresholds_json() -> dict[str, Any]:
    ts = ThresholdSet(
        vocab=list(VOCAB),
        objective="f1",
        policy="global",
        global_threshold=0.4,
        per_label=dict.fromkeys(VOCAB, 0.4),
        support=dict.fromkeys(VOCAB, 30),
    )
    return ts.to_json()


def metrics_with(m_ap: float) -> dict[str, Any]:
    return {
        "validation": {"mAP": m_ap, "accuracy_multi": 0.99, "f1_micro": 0.97},
        "dataset": {"name": "shapes", "n_train": 10},
        "wall_time_s": 1.5,
    }


def inference() -> dict[str, Any]:
    return {"img_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3, "vocab": VOCAB, "arch": "x"}


def register(home: str, tmp_path: Path, m_ap: float = 0.9, **kwargs: Any) -> str:
    learner_file = tmp_path / f"export-{uuid.uuid4().hex[:6]}.pkl"
    learner_file.write_bytes(b"pretend pickle " + uuid.uuid4().bytes)
    kwargs.setdefault("report_files", {"report.md": b"# report\n"})
    return registry.register_model(
        home,
        learner_file=learner_file,
        thresholds=thresholds_json(),
        metrics=metrics_with(m_ap),
        inference=inference(),
        **kwargs,
    )


def flip_one_byte(uri: str) -> None:
    data = bytearray(read_bytes(uri))
    data[len(data) // 2] ^= 0x01
    write_bytes_atomic(uri, bytes(data))


def vfile(home: str, version: str, name: str) -> str:
    return join(home, "models", version, name)


def pointer_uri(home: str) -> str:
    """The readable champion pointer of the model name these tests register under: versions
    are named after metrics["dataset"]["name"] by default."""
    return join(home, "models", "_champion", "shapes", "champion.json")


# ---------------------------------------------------------------------------- round trip


def test_round_trip_register_list_show_load(home: str, tmp_path: Path, loader: FakeLoader):
    learner_file = tmp_path / "export.pkl"
    learner_file.write_bytes(b"model bytes " * 100)
    version = registry.register_model(
        home,
        learner_file=learner_file,
        thresholds=thresholds_json(),
        metrics=metrics_with(0.9),
        inference=inference(),
        report_files={"report.md": b"# hi\n", "curves.png": b"\x89PNG fake"},
    )
    model_sha = hashlib.sha256(learner_file.read_bytes()).hexdigest()
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", version)
    assert version.endswith(model_sha[:6])

    # SHA256SUMS is sha256sum's format and covers every file but itself.
    sums_text = read_bytes(vfile(home, version, "SHA256SUMS")).decode()
    listed = dict(reversed(line.split("  ", 1)) for line in sums_text.splitlines())
    assert set(listed) == {
        "model.pkl",
        "version.json",
        "thresholds.json",
        "metrics.json",
        "inference.json",
        "report.md",
        "curves.png",
    }
    for name, digest in listed.items():
        assert hashlib.sha256(read_bytes(vfile(home, version, name))).hexdigest() == digest

    [entry] = registry.list_versions(home)
    assert entry["version"] == version and entry["complete"] and entry["problem"] is None
    assert entry["metrics"]["mAP"] == 0.9 and not entry["is_champion"]

    shown = registry.show_version(home, version)
    assert shown["model_sha256"] == model_sha
    assert shown["metrics"] == metrics_with(0.9)
    assert shown["thresholds"]["per_label"] == dict.fromkeys(VOCAB, 0.4)
    assert "curves" not in shown["thresholds"]
    assert shown["report_md"] == "# hi\n"
    assert {f["name"]: f["sha256"] for f in shown["files"]}["model.pkl"] == model_sha

    decision = registry.promote_if_better(home, version, "mAP")
    assert decision.promoted
    loaded = registry.load_model(home)
    assert loaded.version == version and loaded.sha256 == model_sha
    assert loaded.learner == "learner-from-model.pkl"
    assert loaded.thresholds.vocab == VOCAB
    assert loaded.metrics == metrics_with(0.9) and loaded.inference == inference()
    [(_, seen)] = loader.calls
    assert seen == learner_file.read_bytes()
    assert loaded.model_path.read_bytes() == seen  # the verified file is what was unpickled


def test_remote_root_loads_from_verified_cache(tmp_path: Path, loader: FakeLoader, _cache: Path):
    home = f"memory://registry-cache-{uuid.uuid4().hex[:8]}"
    version = register(home, tmp_path)
    first = registry.load_model(home, version)
    assert first.model_path.is_relative_to(_cache)
    # A cached copy that no longer matches is never used: it is fetched and checked again.
    first.model_path.write_bytes(b"evil pickle")
    second = registry.load_model(home, version)
    assert second.model_path == first.model_path
    assert loader.calls[-1][1] == read_bytes(vfile(home, version, "model.pkl"))
    fsspec.filesystem("memory").rm(home, recursive=True)


def test_register_builds_report_when_none_given(tmp_path: Path, loader: FakeLoader):
    home = str(tmp_path / "home")
    grid = [i / 100 for i in range(101)]
    thresholds = thresholds_json()
    thresholds["curves"] = {"thresholds": grid, "global": {"f1_micro": [1 - g for g in grid]}}
    metrics = metrics_with(0.9)
    metrics["validation"]["per_label"] = {
        label: {
            "support": 3,
            "ap": 0.8,
            "f1": 0.7,
            "precision": 0.7,
            "recall": 0.7,
            "threshold": 0.4,
        }
        for label in VOCAB
    }
    learner_file = tmp_path / "m.pkl"
    learner_file.write_bytes(b"m")
    version = registry.register_model(
        home,
        learner_file=learner_file,
        thresholds=thresholds,
        metrics=metrics,
        inference=inference(),
        report_files=None,
    )
    names = {f["name"] for f in registry.show_version(home, version)["files"]}
    assert {"report.md", "threshold_curves.png", "per_label_ap.png"} <= names
    registry.verify_version(home, version)


def test_caller_provided_version_and_reregister_refused(home: str, tmp_path: Path):
    assert register(home, tmp_path, version="v1") == "v1"
    with pytest.raises(VersionExistsError, match="immutable"):
        register(home, tmp_path, version="v1")
    registry.verify_version(home, "v1")  # the refused attempt changed nothing


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", "_decisions", "champion.json", "x" * 101])
def test_invalid_version_ids_refused(tmp_path: Path, bad: str):
    with pytest.raises(RegistryError, match="version"):
        register(str(tmp_path / "home"), tmp_path, version=bad)


def test_vocab_mismatch_between_thresholds_and_model_refused(tmp_path: Path):
    learner_file = tmp_path / "m.pkl"
    learner_file.write_bytes(b"m")
    with pytest.raises(RegistryError, match="vocab"):
        registry.register_model(
            str(tmp_path / "home"),
            learner_file=learner_file,
            thresholds=thresholds_json(),
            metrics=metrics_with(0.9),
            inference={**inference(), "vocab": VOCAB[::-1]},
            report_files={},
        )


def test_metrics_without_validation_refused(tmp_path: Path):
    learner_file = tmp_path / "m.pkl"
    learner_file.write_bytes(b"m")
    with pytest.raises(RegistryError, match=r"metrics\['validation'\]"):
        registry.register_model(
            str(tmp_path / "home"),
            learner_file=learner_file,
            thresholds=thresholds_json(),
            metrics={"mAP": 0.9},
            inference=inference(),
            report_files={},
        )


# ------------------------------------------------------------------------------ integrity


def test_tampered_model_refused_before_unpickling(home: str, tmp_path: Path, loader: FakeLoader):
    version = register(home, tmp_path)
    registry.promote_if_better(home, version, "mAP")
    expected = hashlib.sha256(read_bytes(vfile(home, version, "model.pkl"))).hexdigest()
    flip_one_byte(vfile(home, version, "model.pkl"))
    actual = hashlib.sha256(read_bytes(vfile(home, version, "model.pkl"))).hexdigest()
    for call in (
        lambda: registry.load_model(home),
        lambda: registry.load_model(home, version),
        lambda: registry.load_metadata(home),  # the no-unpickle load checks model.pkl too
        lambda: registry.load_metadata(home, version),
    ):
        with pytest.raises(IntegrityError) as err:
            call()
        assert "model.pkl" in str(err.value)
        assert expected in str(err.value) and actual in str(err.value)
    with pytest.raises(IntegrityError, match=r"model\.pkl"):
        registry.verify_version(home, version)
    assert loader.calls == []


def test_metadata_load_verifies_but_never_unpickles(home: str, tmp_path: Path, loader: FakeLoader):
    version = register(home, tmp_path)
    registry.promote_if_better(home, version, "mAP")
    meta = registry.load_metadata(home)
    assert loader.calls == []
    assert meta.version == version and meta.inference == inference()
    assert meta.sha256 == hashlib.sha256(read_bytes(vfile(home, version, "model.pkl"))).hexdigest()
    assert hashlib.sha256(meta.model_path.read_bytes()).hexdigest() == meta.sha256
    assert list(meta.thresholds.vocab) == list(VOCAB)
    loaded = registry.unpickle_model(meta)
    assert [b for _, b in loader.calls] == [meta.model_path.read_bytes()]
    assert loaded.sha256 == meta.sha256
    # a local file changed after the metadata was read is refused, not unpickled
    meta.model_path.write_bytes(meta.model_path.read_bytes() + b"x")
    with pytest.raises(IntegrityError, match=r"model\.pkl"):
        registry.unpickle_model(meta)
    assert len(loader.calls) == 1


def test_extra_files_are_sealed_and_hashed_when_opened(home: str, tmp_path: Path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx bytes " + uuid.uuid4().bytes)
    record = tmp_path / "fastpath.json"
    record.write_text(json.dumps({"chosen": "onnx-int8"}))
    version = register(home, tmp_path,
                       extra_files={"model.int8.onnx": onnx, "fastpath.json": record})  # fmt: skip
    registry.verify_version(home, version)
    meta = registry.load_metadata(home, version)
    assert meta.fastpath == {"chosen": "onnx-int8"}
    assert meta.sums["model.int8.onnx"] == hashlib.sha256(onnx.read_bytes()).hexdigest()
    assert registry.verified_file(meta, "model.int8.onnx").read_bytes() == onnx.read_bytes()
    with pytest.raises(IntegrityError, match=r"no model\.fp32\.onnx"):
        registry.verified_file(meta, "model.fp32.onnx")
    # load_metadata does not read the ONNX file; opening it checks it
    flip_one_byte(vfile(home, version, "model.int8.onnx"))
    meta = registry.load_metadata(home, version)
    if home.startswith("memory://"):  # the verified cache copy is used, never the new bytes
        assert registry.verified_file(meta, "model.int8.onnx").read_bytes() == onnx.read_bytes()
        shutil.rmtree(Path(os.environ["MULTITAG_CACHE_DIR"]) / "models")
    with pytest.raises(IntegrityError, match=r"model\.int8\.onnx"):
        registry.verified_file(meta, "model.int8.onnx")


@pytest.mark.parametrize("name", ["model.pkl", "SHA256SUMS", "../x.onnx", "report.md"])
def test_extra_file_names_that_would_clash_are_refused(tmp_path: Path, name: str):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with pytest.raises(RegistryError):
        register(str(tmp_path / "home"), tmp_path, extra_files={name: f})


def test_tampered_thresholds_refused(home: str, tmp_path: Path, loader: FakeLoader):
    version = register(home, tmp_path)
    uri = vfile(home, version, "thresholds.json")
    data = json.loads(read_bytes(uri))
    data["per_label"]["star"] = 0.99  # valid JSON, valid thresholds: only the hash can tell
    write_bytes_atomic(uri, json.dumps(data).encode())
    with pytest.raises(IntegrityError, match=r"thresholds\.json"):
        registry.load_model(home, version)
    with pytest.raises(IntegrityError, match=r"thresholds\.json"):
        registry.load_metadata(home, version)
    assert loader.calls == []


def test_incomplete_version_refused_and_flagged(home: str, tmp_path: Path, loader: FakeLoader):
    version = register(home, tmp_path)
    fs, path = fsspec.core.url_to_fs(vfile(home, version, "SHA256SUMS"))
    fs.rm(path)  # as if registration died before its last write
    with pytest.raises(IncompleteVersionError, match="SHA256SUMS"):
        registry.load_model(home, version)
    with pytest.raises(IncompleteVersionError):
        registry.promote_if_better(home, version, "mAP")
    [entry] = registry.list_versions(home)
    assert not entry["complete"] and "is incomplete" in entry["problem"]
    assert registry.get_champion(home) is None
    with pytest.raises(VersionExistsError):  # nor can it be finished by registering over it
        register(home, tmp_path, version=version)
    assert loader.calls == []


def test_file_added_after_registration_refused(home: str, tmp_path: Path, loader: FakeLoader):
    version = register(home, tmp_path)
    write_bytes_atomic(vfile(home, version, "extra.py"), b"print('hi')")
    with pytest.raises(IntegrityError, match=r"not in SHA256SUMS.*extra\.py"):
        registry.load_model(home, version)
    assert registry.list_versions(home)[0]["problem"]


def test_champion_pointer_with_wrong_sha_refused(home: str, tmp_path: Path, loader: FakeLoader):
    version = register(home, tmp_path)
    registry.promote_if_better(home, version, "mAP")
    uri = pointer_uri(home)
    champion = json.loads(read_bytes(uri))
    write_bytes_atomic(uri, json.dumps({**champion, "sha256": "0" * 64}).encode())
    with pytest.raises(IntegrityError, match=r"champion\.json"):
        registry.load_model(home)
    assert loader.calls == []


def test_no_champion_error_hints_what_to_do(home: str, tmp_path: Path):
    with pytest.raises(NoChampionError, match=r"multitag retrain.*models promote"):
        registry.load_model(home)
    register(home, tmp_path)  # registered but never promoted: still no champion
    with pytest.raises(NoChampionError):
        registry.load_model(home)


def test_missing_version_is_not_found(home: str):
    with pytest.raises(registry.VersionNotFoundError, match="nope"):
        registry.load_model(home, "nope")
    assert registry.list_versions(home) == []


# ----------------------------------------------------------------------------------- gate


def test_gate_keeps_the_better_champion(home: str, tmp_path: Path):
    a = register(home, tmp_path, 0.9, version="a")
    b = register(home, tmp_path, 0.8, version="b")
    c = register(home, tmp_path, 0.95, version="c")
    tie = register(home, tmp_path, 0.95, version="tie")
    worse = register(home, tmp_path, 0.5, version="worse")

    first = registry.promote_if_better(home, a, "mAP")
    assert first.promoted and first.champion_version is None and first.candidate_value == 0.9

    kept = registry.promote_if_better(home, b, "mAP")
    assert not kept.promoted
    assert (kept.candidate_value, kept.champion_value, kept.champion_version) == (0.8, 0.9, a)
    assert registry.get_champion(home)["version"] == a
    [recorded] = registry.list_decisions(home, b)
    assert recorded == kept.to_dict()
    assert recorded["candidate_value"] == 0.8 and recorded["champion_value"] == 0.9

    assert registry.promote_if_better(home, c, "mAP").promoted
    assert not registry.promote_if_better(home, tie, "mAP").promoted  # must strictly beat

    forced = registry.promote_if_better(home, worse, "mAP", force=True)
    assert forced.promoted and forced.forced and "forced" in forced.reason
    assert (forced.candidate_value, forced.champion_value) == (0.5, 0.95)

    champion = registry.get_champion(home)
    assert champion["version"] == worse and champion["previous"] == c
    assert champion["metric"] == "mAP" and champion["value"] == 0.5
    sha = hashlib.sha256(read_bytes(vfile(home, worse, "model.pkl"))).hexdigest()
    assert champion["sha256"] == sha
    assert [v["is_champion"] for v in registry.list_versions(home)] == [
        False,
        False,
        False,
        False,
        True,
    ]
    assert len(registry.list_decisions(home)) == 5
    registry.verify_version(home, a)  # decisions never touch a version folder


def test_explicit_promote_is_forced_and_recorded(home: str, tmp_path: Path):
    good = register(home, tmp_path, 0.9, version="good")
    bad = register(home, tmp_path, 0.1, version="bad")
    registry.promote_if_better(home, good, "mAP")
    decision = registry.promote(home, bad)
    assert decision.promoted and decision.champion_value == 0.9
    assert registry.get_champion(home)["version"] == bad
    assert registry.show_version(home, bad)["decisions"][-1]["promoted"]


def test_promotion_refuses_a_tampered_version(home: str, tmp_path: Path):
    good = register(home, tmp_path, 0.5, version="good")
    registry.promote_if_better(home, good, "mAP")
    better = register(home, tmp_path, 0.99, version="better")
    flip_one_byte(vfile(home, better, "model.pkl"))
    for force in (False, True):
        with pytest.raises(IntegrityError, match=r"model\.pkl"):
            registry.promote_if_better(home, better, "mAP", force=force)
    assert registry.get_champion(home)["version"] == good


def test_gate_needs_the_metric(home: str, tmp_path: Path):
    version = register(home, tmp_path, 0.9)
    with pytest.raises(RegistryError, match="f1_macro"):
        registry.promote_if_better(home, version, "f1_macro")
    assert registry.get_champion(home) is None
    forced = registry.promote_if_better(home, version, "f1_macro", force=True)
    assert forced.promoted and forced.candidate_value is None


# ------------------------------------------------------------------------------------ S3


@pytest.fixture
def s3_home(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A bucket on a local moto S3 server: the real s3fs code path, no network."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="multitag-test")
    yield "s3://multitag-test/home"
    server.stop()


def test_s3_round_trip_and_tamper(s3_home: str, tmp_path: Path, loader: FakeLoader, _cache: Path):
    a = register(s3_home, tmp_path, 0.9)
    assert registry.promote_if_better(s3_home, a, "mAP").promoted
    with pytest.raises(VersionExistsError):
        register(s3_home, tmp_path, version=a)
    loaded = registry.load_model(s3_home)
    assert loaded.version == a and loaded.model_path.is_relative_to(_cache)
    assert loader.calls[-1][1] == read_bytes(vfile(s3_home, a, "model.pkl"))
    flip_one_byte(vfile(s3_home, a, "model.pkl"))
    loaded.model_path.unlink()  # force a fresh download of the tampered object
    with pytest.raises(IntegrityError, match=r"model\.pkl"):
        registry.load_model(s3_home)
    assert len(loader.calls) == 1


# ------------------------------------------------------- compare-and-swap promotion chain


def raw_champion(home: str) -> dict[str, Any]:
    return json.loads(read_bytes(pointer_uri(home)))


def test_promotion_chain_and_decision_log_agree_with_the_pointer(home: str, tmp_path: Path):
    a = register(home, tmp_path, 0.5, version="a")
    b = register(home, tmp_path, 0.7, version="b")
    c = register(home, tmp_path, 0.6, version="c")
    d = register(home, tmp_path, 0.9, version="d")
    for version in (a, b, c, d):
        registry.promote_if_better(home, version, "mAP")
    promoted = [x for x in registry.list_decisions(home) if x["promoted"]]
    assert [x["version"] for x in promoted] == [a, b, d]
    assert [x["generation"] for x in promoted] == [1, 2, 3]
    assert [x["champion_version"] for x in promoted] == [None, a, b]
    [rejected] = [x for x in registry.list_decisions(home) if not x["promoted"]]
    assert rejected["version"] == c and rejected["generation"] is None
    champion = registry.get_champion(home)
    assert champion == raw_champion(home)
    assert champion["version"] == d and champion["generation"] == 3 and champion["previous"] == b
    assert champion["decision"] == promoted[-1]


def _intrude_once(monkeypatch: pytest.MonkeyPatch, intrude: Any) -> None:
    """Run `intrude` right after the next promotion has read the chain: a real lost swap."""
    real = champion._chain_head
    pending = [intrude]

    def head_then_intrude(home: str | None, name: str) -> Any:
        head = real(home, name)
        if pending:
            pending.pop()()
        return head

    monkeypatch.setattr(champion, "_chain_head", head_then_intrude)


def test_a_lost_swap_is_judged_again_against_the_winner(
    home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    a = register(home, tmp_path, 0.5, version="a")
    best = register(home, tmp_path, 0.9, version="best")
    mid = register(home, tmp_path, 0.7, version="mid")
    registry.promote_if_better(home, a, "mAP")
    # mid beats a, the champion it read, but best takes the generation first: mid must lose.
    _intrude_once(monkeypatch, lambda: registry.promote_if_better(home, best, "mAP"))
    decision = registry.promote_if_better(home, mid, "mAP")
    assert not decision.promoted and decision.lost_swaps == 1
    assert (decision.champion_version, decision.champion_value) == (best, 0.9)
    assert registry.get_champion(home)["version"] == best == raw_champion(home)["version"]
    assert [x["version"] for x in registry.list_decisions(home) if x["promoted"]] == [a, best]


def test_a_lost_swap_that_still_wins_takes_the_next_generation(
    home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    a = register(home, tmp_path, 0.5, version="a")
    best = register(home, tmp_path, 0.9, version="best")
    mid = register(home, tmp_path, 0.7, version="mid")
    registry.promote_if_better(home, a, "mAP")
    _intrude_once(monkeypatch, lambda: registry.promote_if_better(home, mid, "mAP"))
    decision = registry.promote_if_better(home, best, "mAP")
    assert decision.promoted and decision.lost_swaps == 1 and decision.generation == 3
    assert (decision.champion_version, decision.champion_value) == (mid, 0.7)
    champion = registry.get_champion(home)
    assert champion["version"] == best and champion["previous"] == mid
    assert raw_champion(home) == champion


def test_a_pointer_left_behind_by_a_killed_promoter_is_stepped_past(
    home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: FakeLoader
):
    a = register(home, tmp_path, 0.5, version="a")
    b = register(home, tmp_path, 0.7, version="b")
    c = register(home, tmp_path, 0.6, version="c")
    registry.promote_if_better(home, a, "mAP")
    with monkeypatch.context() as m:  # killed after its swap, before champion.json moved
        m.setattr(champion, "_point_champion", lambda *args: None)
        assert registry.promote_if_better(home, b, "mAP").promoted
    assert raw_champion(home)["version"] == a  # stale pointer...
    assert registry.get_champion(home)["version"] == b  # ...that readers step past
    assert registry.load_model(home).version == b
    assert not registry.promote_if_better(home, c, "mAP").promoted  # judged against b
    assert registry.promote(home, c).promoted  # the next promotion re-points champion.json
    assert raw_champion(home)["version"] == c and raw_champion(home)["generation"] == 3


def test_an_altered_champion_pointer_is_refused_at_tag_time(
    home: str, tmp_path: Path, loader: FakeLoader
):
    from multitag import tagging
    from multitag.config import TagParams

    version = register(home, tmp_path)
    registry.promote_if_better(home, version, "mAP")
    params = TagParams(source=str(tmp_path), home=home)
    assert tagging.resolve_model_version(params) == version
    uri = pointer_uri(home)
    good = read_bytes(uri)
    write_bytes_atomic(uri, json.dumps({**json.loads(good), "sha256": "0" * 64}).encode())
    with pytest.raises(IntegrityError, match=r"champion\.json .*was not used"):
        tagging.resolve_model_version(params)
    # A pointer from before the chain (no generation) is still checked against the version.
    legacy = {"version": version, "sha256": "1" * 64, "metric": "mAP", "value": 0.9}
    fs, path = fsspec.core.url_to_fs(join(home, "models", "_champion"))
    fs.rm(path, recursive=True)
    write_bytes_atomic(join(home, "models", "champion.json"), json.dumps(legacy).encode())
    with pytest.raises(IntegrityError, match=r"champion\.json names .*1111.*SHA256SUMS says"):
        tagging.resolve_model_version(params)
    assert loader.calls == []


def test_a_model_swapped_between_check_and_load_is_never_unpickled(
    tmp_path: Path, loader: FakeLoader
):
    home = str(tmp_path / "home")
    version = register(home, tmp_path)
    meta = registry.load_metadata(home, version)
    verified = meta.model_path.read_bytes()
    # The swap happens after the registry hashed the file, right before the loader reads.
    loader.before_read = lambda: meta.model_path.write_bytes(b"evil pickle")
    registry.unpickle_model(meta)
    assert [b for _, b in loader.calls] == [verified]
    assert meta.model_path.read_bytes() == b"evil pickle"
    with pytest.raises(IntegrityError, match=r"model\.pkl"):  # and the next load refuses it
        registry.unpickle_model(meta)


# ------------------------------------------------------------ reused training stages


def _stage(stage: Path) -> Path:
    """A finished stage as train_stage leaves it: train.json (last) records the sha256s."""
    import numpy as np

    from multitag.training import retraining

    stage.mkdir(parents=True)
    (stage / "model.pkl").write_bytes(b"staged learner " + uuid.uuid4().bytes)
    retraining._save_npz(
        stage / "valid_preds.npz", probs=np.zeros((2, 3)), targets=np.zeros((2, 3), bool)
    )
    sums = {n: hashlib.sha256((stage / n).read_bytes()).hexdigest()
            for n in ("model.pkl", "valid_preds.npz")}  # fmt: skip
    for name, obj in (("thresholds.json", thresholds_json()), ("evaluation.json", {})):
        retraining._write_json(stage / name, obj)
    retraining._write_json(stage / "train.json", {"vocab": VOCAB, "sha256": sums})
    return stage


def test_a_tampered_staged_model_is_not_reused_nor_unpickled(
    tmp_path: Path, loader: FakeLoader, monkeypatch: pytest.MonkeyPatch
):
    from multitag.training import retraining

    stage = _stage(tmp_path / "stage")
    assert retraining.stage_problem(stage) is None and retraining.stage_complete(stage)
    flip_one_byte(str(stage / "model.pkl"))
    problem = retraining.stage_problem(stage)
    assert problem and "model.pkl" in problem and "changed after training" in problem
    assert not retraining.stage_complete(stage)
    with pytest.raises(retraining.StageIntegrityError, match=r"model\.pkl"):
        retraining.register_stage(stage, str(tmp_path / "home"), dataset={}, contract_summary={})
    assert loader.calls == []
    # A stage from before sha256s were recorded cannot be vouched for either.
    old = _stage(tmp_path / "old")
    retraining._write_json(old / "train.json", {"vocab": VOCAB})
    assert "records no sha256" in (retraining.stage_problem(old) or "")


def test_stage_files_are_written_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from multitag.training import retraining

    target = tmp_path / "train.json"
    target.write_text('{"old": true}\n')
    real_fsync = os.fsync

    def die(fd: int) -> None:  # the process dies before the new content is in place
        real_fsync(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", die)
    with pytest.raises(KeyboardInterrupt):
        retraining._write_json(target, {"new": list(range(1000))})
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["train.json"]
