"""The champion gate refuses a model no better than guessing (issue 17 item 4).

Real registry on local disk; the metrics are written as `register_stage` writes them, with
the label-prior baselines next to the validation figures.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from multitag import registry
from multitag.config import BASELINE_MARGIN, RetrainParams
from multitag.registry import RegistryError
from multitag.training.thresholds import ThresholdSet

VOCAB = ["circle", "square"]


def register(home: str, tmp_path: Path, value: float, baseline: float | None) -> str:
    learner_file = tmp_path / f"export-{uuid.uuid4().hex[:6]}.pkl"
    learner_file.write_bytes(b"pretend pickle " + uuid.uuid4().bytes)
    ts = ThresholdSet(
        vocab=list(VOCAB), objective="f1", policy="global", global_threshold=0.5,
        per_label=dict.fromkeys(VOCAB, 0.5), support=dict.fromkeys(VOCAB, 10),
    )  # fmt: skip
    metrics: dict[str, Any] = {"validation": {"mAP": value, "accuracy_multi": value}}
    if baseline is not None:
        metrics["baselines"] = {"mAP": baseline, "accuracy_multi": baseline}
    return registry.register_model(
        home,
        learner_file=learner_file,
        thresholds=ts.to_json(),
        metrics=metrics,
        inference={"img_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3, "vocab": VOCAB},
        report_files={"report.md": b"# report\n"},
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MULTITAG_CACHE_DIR", str(tmp_path / "cache"))
    return str(tmp_path / "home")


def test_default_margin_is_the_documented_one() -> None:
    assert RetrainParams().baseline_margin == BASELINE_MARGIN == 0.02


@pytest.mark.parametrize("value", [0.845, 0.852, 0.865])  # below, inside, exactly at the margin
def test_no_better_than_guessing_is_refused_even_without_a_champion(
    home: str, tmp_path: Path, value: float
) -> None:
    version = register(home, tmp_path, value, baseline=0.845)
    decision = registry.promote_if_better(home, version, "mAP")
    assert not decision.promoted and not decision.forced_past_baseline
    assert registry.get_champion(home) is None
    assert "label-prior baseline 0.845" in decision.reason and "margin 0.02" in decision.reason
    assert decision.baseline_value == 0.845 and decision.baseline_margin == BASELINE_MARGIN
    [recorded] = registry.list_decisions(home, version)
    assert recorded["promoted"] is False and recorded["baseline_value"] == 0.845


def test_clearly_better_than_guessing_becomes_the_first_champion(home: str, tmp_path: Path) -> None:
    version = register(home, tmp_path, 0.9, baseline=0.845)
    decision = registry.promote_if_better(home, version, "mAP")
    assert decision.promoted and decision.reason == "no champion yet"
    assert not decision.forced_past_baseline and decision.baseline_value == 0.845
    assert registry.get_champion(home)["version"] == version


def test_the_baseline_is_per_metric_and_the_margin_is_a_parameter(
    home: str, tmp_path: Path
) -> None:
    # accuracy_multi 0.653 vs 0.71 for "no label at all" (the playing-cards case).
    cards = register(home, tmp_path, 0.653, baseline=0.71)
    assert not registry.promote_if_better(home, cards, "accuracy_multi").promoted
    close = register(home, tmp_path, 0.86, baseline=0.845)
    assert not registry.promote_if_better(home, close, "mAP").promoted
    assert registry.promote_if_better(home, close, "mAP", baseline_margin=0.01).promoted
    with pytest.raises(RegistryError, match="baseline_margin"):
        registry.promote_if_better(home, close, "mAP", baseline_margin=-0.1)


def test_a_better_than_champion_model_below_baseline_is_still_refused(
    home: str, tmp_path: Path
) -> None:
    old = register(home, tmp_path, 0.5, baseline=None)  # registered before baselines
    assert registry.promote_if_better(home, old, "mAP").promoted  # judged as before
    worse = register(home, tmp_path, 0.6, baseline=0.7)
    decision = registry.promote_if_better(home, worse, "mAP")
    assert not decision.promoted and "baseline" in decision.reason
    assert decision.champion_version == old
    assert registry.get_champion(home)["version"] == old


def test_force_overrides_the_baseline_and_says_so(home: str, tmp_path: Path) -> None:
    version = register(home, tmp_path, 0.80, baseline=0.845)
    decision = registry.promote_if_better(home, version, "mAP", force=True)
    assert decision.promoted and decision.forced and decision.forced_past_baseline
    assert decision.reason.startswith("forced past the baseline")
    champ = registry.get_champion(home)
    assert champ["version"] == version and champ["decision"]["forced_past_baseline"] is True
    # `multitag models promote` is forced too, and records the same.
    other = register(home, tmp_path, 0.70, baseline=0.845)
    assert registry.promote(home, other).forced_past_baseline


def test_versions_without_baselines_are_judged_as_before(home: str, tmp_path: Path) -> None:
    first = register(home, tmp_path, 0.3, baseline=None)
    decision = registry.promote_if_better(home, first, "mAP")
    assert decision.promoted and decision.reason == "no champion yet"
    assert decision.baseline_value is None and decision.baseline_margin is None


def test_models_show_lists_the_baselines(home: str, tmp_path: Path) -> None:
    version = register(home, tmp_path, 0.9, baseline=0.845)
    shown = registry.show_version(home, version)
    assert shown["baselines"] == {"mAP": 0.845, "accuracy_multi": 0.845}
    older = register(home, tmp_path, 0.9, baseline=None)
    assert registry.show_version(home, older)["baselines"] is None


def test_retrain_command_line_sets_the_margin() -> None:
    from flows.cli import _retrain_params, build_parser

    args = build_parser().parse_args(["retrain", "--baseline-margin", "0.05"])
    assert _retrain_params(args).baseline_margin == 0.05
    default = build_parser().parse_args(["retrain"])
    assert _retrain_params(default).baseline_margin == BASELINE_MARGIN
    with pytest.raises(ValueError, match="baseline_margin"):
        _retrain_params(build_parser().parse_args(["retrain", "--baseline-margin", "2"]))
