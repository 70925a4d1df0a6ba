"""Named models (issue 17 item 3): a champion per name, promotion only within a name and one
vocabulary, NAME / NAME@VERSION / VERSION references, and registries from before names.

Real registry on local disk with tiny registered versions (the model bytes are never
unpickled); one tag flow run with a tiny real model checks that --model NAME tags with that
name's champion.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from flows.cli import main
from multitag import registry
from multitag.config import RetrainParams, TagParams
from multitag.errors import EXIT_UNUSABLE
from multitag.registry import (
    IntegrityError,
    NoChampionError,
    RegistryError,
    VersionNotFoundError,
)
from multitag.storage import exists, join, read_bytes, write_bytes_atomic
from multitag.training.thresholds import ThresholdSet

CARDS = ["ace", "king", "queen"]
SHAPES = ["circle", "square", "star"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MULTITAG_CACHE_DIR", str(tmp_path / "cache"))
    return str(tmp_path / "home")


def register(
    home: str,
    tmp_path: Path,
    m_ap: float,
    *,
    name: str | None = None,
    vocab: list[str] = SHAPES,
    dataset: str | None = "shapes",
    version: str | None = None,
) -> str:
    learner = tmp_path / f"export-{uuid.uuid4().hex[:6]}.pkl"
    learner.write_bytes(b"pretend pickle " + uuid.uuid4().bytes)
    thresholds = ThresholdSet(
        vocab=list(vocab), objective="f1", policy="global", global_threshold=0.5,
        per_label=dict.fromkeys(vocab, 0.5), support=dict.fromkeys(vocab, 10),
    ).to_json()  # fmt: skip
    metrics: dict[str, Any] = {"validation": {"mAP": m_ap}}
    if dataset is not None:
        metrics["dataset"] = {"name": dataset}
    return registry.register_model(
        home,
        learner_file=learner,
        thresholds=thresholds,
        metrics=metrics,
        inference={"img_size": 8, "mean": [0.5] * 3, "std": [0.2] * 3, "vocab": list(vocab)},
        report_files={},
        version=version,
        name=name,
    )


def vfile(home: str, version: str, name: str) -> str:
    return join(home, "models", version, name)


# ---------------------------------------------------------------------------- registering


def test_the_name_is_recorded_and_defaults_to_the_datasets(home: str, tmp_path: Path) -> None:
    named = register(home, tmp_path, 0.9, name="cards", vocab=CARDS, dataset="poker-photos")
    default = register(home, tmp_path, 0.9, dataset="shapes")
    nameless = register(home, tmp_path, 0.9, dataset=None)
    records = {v: json.loads(read_bytes(vfile(home, v, "version.json"))) for v in (named, default)}
    assert records[named]["name"] == "cards" and records[default]["name"] == "shapes"
    names = {v["version"]: v["name"] for v in registry.list_versions(home)}
    assert names == {named: "cards", default: "shapes", nameless: "default"}
    assert registry.show_version(home, named)["name"] == "cards"
    assert RetrainParams().model_name is None
    assert RetrainParams(model_name="cards").model_name == "cards"


@pytest.mark.parametrize("bad", ["../x", "a/b", "a..b", "gen-000000001.json", "champion.json", ""])
def test_names_are_plain_and_traversal_free(home: str, tmp_path: Path, bad: str) -> None:
    with pytest.raises(RegistryError, match="model name"):
        register(home, tmp_path, 0.9, name=bad)
    assert registry.list_versions(home) == []
    with pytest.raises(ValueError, match="model_name"):  # refused before any training
        RetrainParams(model_name=bad)


def test_a_name_that_contradicts_metrics_is_refused(home: str, tmp_path: Path) -> None:
    learner = tmp_path / "m.pkl"
    learner.write_bytes(b"m")
    thresholds = ThresholdSet(
        vocab=SHAPES, objective="f1", policy="global", global_threshold=0.5,
        per_label=dict.fromkeys(SHAPES, 0.5), support=dict.fromkeys(SHAPES, 1),
    ).to_json()  # fmt: skip
    with pytest.raises(RegistryError, match="differs from metrics"):
        registry.register_model(
            home, learner_file=learner, thresholds=thresholds,
            metrics={"validation": {"mAP": 0.5}, "name": "shapes"},
            inference={"vocab": SHAPES}, report_files={}, name="cards",
        )  # fmt: skip


def test_default_names_are_made_valid() -> None:
    assert registry.default_model_name("VOCtrainval 06/Nov..2007") == "VOCtrainval-06-Nov.2007"
    assert registry.default_model_name("..") == registry.DEFAULT_NAME == "default"
    assert registry.default_model_name(None) == "default"


# ---------------------------------------------------------------------- champion per name


def test_two_names_each_have_their_own_champion(home: str, tmp_path: Path) -> None:
    # The case: cards at mAP 0.395 were compared with a shapes champion at 0.999.
    shapes = register(home, tmp_path, 0.999, name="shapes")
    cards = register(home, tmp_path, 0.395, name="cards", vocab=CARDS)
    assert registry.promote_if_better(home, shapes, "mAP").promoted
    decision = registry.promote_if_better(home, cards, "mAP")
    assert decision.promoted and decision.name == "cards"
    assert decision.champion_version is None and decision.champion_value is None
    assert decision.reason == "no champion yet"

    assert registry.get_champion(home, "shapes")["version"] == shapes
    assert registry.get_champion(home, "cards")["version"] == cards
    assert registry.get_champion(home, "cards")["name"] == "cards"
    assert sorted(registry.champions(home)) == ["cards", "shapes"]
    for name, version in (("shapes", shapes), ("cards", cards)):  # one readable pointer each
        pointer = join(home, "models", "_champion", name, "champion.json")
        assert json.loads(read_bytes(pointer))["version"] == version
    assert not exists(join(home, "models", "champion.json"))  # no global pointer any more
    assert {v["version"] for v in registry.list_versions(home) if v["is_champion"]} == {
        shapes,
        cards,
    }
    with pytest.raises(RegistryError, match="cards, shapes") as err:
        registry.get_champion(home)  # which one? ambiguous, and the error says the names
    assert err.value.exit_code == EXIT_UNUSABLE


def test_a_candidate_is_judged_only_against_its_own_names_champion(
    home: str, tmp_path: Path
) -> None:
    shapes = register(home, tmp_path, 0.999, name="shapes")
    cards1 = register(home, tmp_path, 0.395, name="cards", vocab=CARDS)
    cards2 = register(home, tmp_path, 0.5, name="cards", vocab=CARDS)
    cards3 = register(home, tmp_path, 0.45, name="cards", vocab=CARDS)
    for version in (shapes, cards1):
        registry.promote_if_better(home, version, "mAP")
    better = registry.promote_if_better(home, cards2, "mAP")
    assert better.promoted and (better.champion_version, better.champion_value) == (cards1, 0.395)
    assert better.generation == 2  # the second generation of cards' own chain
    worse = registry.promote_if_better(home, cards3, "mAP")
    assert not worse.promoted and (worse.champion_version, worse.champion_value) == (cards2, 0.5)
    assert registry.get_champion(home, "shapes")["version"] == shapes
    compared = {
        d["champion_version"] for d in registry.list_decisions(home) if d["name"] == "cards"
    }
    assert shapes not in compared


def test_another_vocabulary_under_the_same_name_is_refused_unless_forced(
    home: str, tmp_path: Path
) -> None:
    champion = register(home, tmp_path, 0.6, name="cards", vocab=CARDS)
    other = register(home, tmp_path, 0.99, name="cards", vocab=["ace", "king", "jack"])
    registry.promote_if_better(home, champion, "mAP")
    refused = registry.promote_if_better(home, other, "mAP")
    assert not refused.promoted and "vocabulary" in refused.reason and "jack" in refused.reason
    assert refused.champion_version == champion
    assert refused.champion_value is None  # never compared on metrics
    assert registry.get_champion(home, "cards")["version"] == champion
    forced = registry.promote(home, other)
    assert forced.promoted and forced.reason.startswith("forced: vocabulary")
    assert registry.get_champion(home, "cards")["version"] == other


# ------------------------------------------------------------------------------ resolving


def test_references_resolve_to_versions(home: str, tmp_path: Path) -> None:
    shapes = register(home, tmp_path, 0.9, name="shapes", version="v-shapes")
    cards = register(home, tmp_path, 0.7, name="cards", vocab=CARDS, version="v-cards")
    old_cards = register(home, tmp_path, 0.6, name="cards", vocab=CARDS, version="v-cards-0")
    registry.promote_if_better(home, shapes, "mAP")
    assert registry.resolve_model_ref(home, None) == shapes  # the only champion
    registry.promote_if_better(home, cards, "mAP")

    assert registry.resolve_model_ref(home, "shapes") == shapes
    assert registry.resolve_model_ref(home, "cards") == cards
    assert registry.resolve_model_ref(home, f"cards@{old_cards}") == old_cards
    assert registry.resolve_model_ref(home, old_cards) == old_cards

    with pytest.raises(RegistryError, match="cards, shapes"):
        registry.resolve_model_ref(home, None)
    with pytest.raises(RegistryError, match=r"belongs to model 'cards', not 'shapes'"):
        registry.resolve_model_ref(home, f"shapes@{cards}")
    with pytest.raises(VersionNotFoundError, match=r"'blood'.*cards, shapes"):
        registry.resolve_model_ref(home, "blood")
    with pytest.raises(VersionNotFoundError, match="v-nope"):
        registry.resolve_model_ref(home, "cards@v-nope")
    with pytest.raises(RegistryError, match="model name"):
        registry.resolve_model_ref(home, "../x@v-cards")
    register(home, tmp_path, 0.5, name="blood", version="v-blood")
    with pytest.raises(NoChampionError, match="blood@VERSION"):
        registry.resolve_model_ref(home, "blood")
    # A word that is both a version id and a name with another champion is not guessed at.
    register(home, tmp_path, 0.9, name="v-shapes", version="v-other")
    registry.promote_if_better(home, "v-other", "mAP")
    with pytest.raises(RegistryError, match="both a model version and a model name"):
        registry.resolve_model_ref(home, "v-shapes")
    for err in (VersionNotFoundError, NoChampionError, RegistryError):
        assert err("x").exit_code == EXIT_UNUSABLE


def test_an_altered_name_pointer_is_refused(home: str, tmp_path: Path) -> None:
    version = register(home, tmp_path, 0.9, name="cards", vocab=CARDS)
    registry.promote_if_better(home, version, "mAP")
    pointer = join(home, "models", "_champion", "cards", "champion.json")
    record = json.loads(read_bytes(pointer))
    write_bytes_atomic(pointer, json.dumps({**record, "sha256": "0" * 64}).encode())
    with pytest.raises(IntegrityError, match=r"champion\.json .*was not used"):
        registry.resolve_model_ref(home, "cards")


def test_the_cli_lists_names_and_promotes_name_at_version(
    home: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shapes = register(home, tmp_path, 0.9, name="shapes")
    cards = register(home, tmp_path, 0.7, name="cards", vocab=CARDS)
    registry.promote_if_better(home, shapes, "mAP")
    assert main(["models", "promote", f"cards@{cards}", "--home", home]) == 0
    assert registry.get_champion(home, "cards")["version"] == cards
    capsys.readouterr()
    assert main(["models", "list", "--home", home]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line.split()[1] for line in lines if line.startswith("*")} == {"shapes", "cards"}
    assert main(["models", "list", "--name", "cards", "--home", home]) == 0
    [only] = capsys.readouterr().out.splitlines()
    assert cards in only and "cards" in only
    assert main(["models", "promote", f"shapes@{cards}", "--home", home]) == EXIT_UNUSABLE
    assert "belongs to model 'cards'" in capsys.readouterr().err
    assert registry.get_champion(home, "shapes")["version"] == shapes


# ----------------------------------------------------------------------- legacy registries


def write_legacy_chain(home: str, version: str) -> dict[str, Any]:
    """A registry as the release before names left it: one global chain and pointer."""
    sums = registry.parse_sums(read_bytes(vfile(home, version, "SHA256SUMS")))
    record = {
        "version": version, "sha256": sums["model.pkl"], "metric": "mAP", "value": 0.8,
        "promoted_at": "2026-01-01T00:00:00.000000Z", "forced": False, "previous": None,
        "generation": 1, "decision": {"version": version, "promoted": True, "generation": 1,
                                      "decided_at": "2026-01-01T00:00:00.000000Z"},
    }  # fmt: skip
    for uri in ("_champion/gen-000000001.json", "champion.json"):
        write_bytes_atomic(join(home, "models", uri), json.dumps(record).encode())
    return record


def strip_name(home: str, version: str) -> None:
    """Make a version look registered before names: no "name" in its version.json."""
    uri = vfile(home, version, "version.json")
    record = json.loads(read_bytes(uri))
    del record["name"]
    data = json.dumps(record).encode()
    write_bytes_atomic(uri, data)
    sums = registry.parse_sums(read_bytes(vfile(home, version, "SHA256SUMS")))
    sums["version.json"] = hashlib.sha256(data).hexdigest()
    write_bytes_atomic(vfile(home, version, "SHA256SUMS"), registry.format_sums(sums))


def test_a_legacy_chain_counts_for_its_versions_name(home: str, tmp_path: Path) -> None:
    old = register(home, tmp_path, 0.8, dataset="shapes", version="old")
    strip_name(home, old)  # named from metrics["dataset"]["name"]
    legacy = write_legacy_chain(home, old)
    registry.verify_version(home, old)
    assert registry.get_champion(home) == legacy == registry.get_champion(home, "shapes")
    assert registry.get_champion(home, "cards") is None
    assert registry.resolve_model_ref(home, None) == old
    assert registry.resolve_model_ref(home, "shapes") == registry.resolve_model_ref(home, old)
    [entry] = registry.list_versions(home)
    assert entry["name"] == "shapes" and entry["is_champion"]

    cards = register(home, tmp_path, 0.3, name="cards", vocab=CARDS)
    first = registry.promote_if_better(home, cards, "mAP")
    assert first.promoted and first.champion_version is None  # not judged against shapes
    worse = register(home, tmp_path, 0.7, dataset="shapes")
    refused = registry.promote_if_better(home, worse, "mAP")
    assert not refused.promoted and refused.champion_version == old  # the legacy champion
    better = register(home, tmp_path, 0.9, dataset="shapes")
    won = registry.promote_if_better(home, better, "mAP")
    assert won.promoted and (won.champion_version, won.generation) == (old, 1)
    champion = registry.get_champion(home, "shapes")
    assert champion["version"] == better and champion["previous"] == old
    # The legacy files are read, never rewritten: an older release still sees its champion.
    assert json.loads(read_bytes(join(home, "models", "champion.json"))) == legacy
    assert registry.resolve_model_ref(home, "shapes") == better


def test_a_legacy_version_without_a_dataset_name_is_called_default(
    home: str, tmp_path: Path
) -> None:
    old = register(home, tmp_path, 0.8, dataset=None, version="old")
    strip_name(home, old)
    write_legacy_chain(home, old)
    assert registry.list_versions(home)[0]["name"] == "default"
    assert registry.resolve_model_ref(home, "default") == old


# ------------------------------------------------------------------------------- tagging


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_tagging_with_model_name_uses_that_names_champion(tmp_path: Path) -> None:
    from multitag import tagging
    from tests.tag_runs import run_tag_flow
    from tests.tagging_helpers import register_tiny_model, write_images

    home = tmp_path / "home"
    tiny = register_tiny_model(home, tmp_path / "work", promote=False)
    versions = {}
    for name in ("left", "right"):  # the same tiny model under two names, both champions
        versions[name] = registry.register_model(
            str(home), learner_file=tiny.learner_file, thresholds=tiny.thresholds,
            metrics=tiny.metrics, inference=tiny.inference, report_files={},
            version=f"v-{name}", name=name,
        )  # fmt: skip
        registry.promote(str(home), versions[name])
    src = tmp_path / "src"
    write_images(src, 3)
    params = TagParams(
        source=str(src), out=str(tmp_path / "out"), home=str(home), model="right",
        batch_size=8, decode_workers=1, precision="fp32",
    )  # fmt: skip
    with pytest.raises(RegistryError, match="left, right"):  # no model: which champion?
        tagging.resolve_model_version(params.model_copy(update={"model": None}))
    assert tagging.resolve_model_version(params.model_copy(update={"model": "left@v-left"})) == (
        "v-left"
    )
    summary = run_tag_flow(params)
    assert summary.model_version == versions["right"]
    assert summary.output_uri.endswith("model=v-right")
