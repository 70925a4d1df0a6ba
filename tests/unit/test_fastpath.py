"""Fast CPU scorers: ONNX export matches torch, agreement is counted right, the auto policy
falls back to fp32 below the bar, the cache is keyed by the model's sha256 and never loads a
changed file, and precision=fp32 stays torch eager."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from multitag import fastpath, tagging
from multitag.config import TagParams
from multitag.tagging import TorchScorer
from tests.tagging_helpers import TinyModel, register_tiny_model, write_images

SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHA = "ab" * 32


def tiny_net():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    with torch.no_grad():  # BN statistics that are not the identity, so folding is exercised
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3), dtype=np.uint8)
    noise = rng.integers(0, 64, (n, SIZE, SIZE, 3), dtype=np.uint8)
    return (base // 2 + noise).astype(np.uint8)


def thresholds_for(net, imgs: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Per-label medians of the fp32 scores: half the decisions are positive, half not."""
    probs = TorchScorer(net, mean=MEAN, std=STD, n_labels=4).score_batch(imgs)
    return np.median(probs, axis=0).astype(np.float64)


def test_onnx_fp32_scores_match_torch(tmp_path: Path) -> None:
    net = tiny_net()
    imgs = images(20)
    path = fastpath.export_onnx(net, tmp_path / "m.onnx", SIZE)
    ort_probs = fastpath.OrtScorer(path, mean=MEAN, std=STD, n_labels=4, threads=1).score_batch(
        imgs
    )
    ref = TorchScorer(net, mean=MEAN, std=STD, n_labels=4).score_batch(imgs)
    assert ort_probs.dtype == np.float32 and ort_probs.shape == (20, 4)
    np.testing.assert_allclose(ort_probs, ref, atol=1e-4)
    # dynamic batch axis: a batch of 1 and of 7 work with the same file
    one = fastpath.OrtScorer(path, mean=MEAN, std=STD, n_labels=4, threads=1)
    np.testing.assert_allclose(one.score_batch(imgs[:1]), ref[:1], atol=1e-4)
    np.testing.assert_allclose(one.score_batch(imgs[3:10]), ref[3:10], atol=1e-4)


def test_onnx_scorer_refuses_a_model_for_another_vocab(tmp_path: Path) -> None:
    path = fastpath.export_onnx(tiny_net(), tmp_path / "m.onnx", SIZE)
    scorer = fastpath.OrtScorer(path, mean=MEAN, std=STD, n_labels=5, threads=1)
    with pytest.raises(fastpath.FastPathError, match="model and vocab"):
        scorer.score_batch(images(2))


def test_decision_agreement_counts_image_label_decisions() -> None:
    ref = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], np.float32)
    same = ref + 0.01  # moves scores, never across a 0.5 threshold
    assert fastpath.decision_agreement(ref, same, 0.5) == 1.0
    flipped = ref.copy()
    flipped[1, 0] = 0.45  # one of six decisions crosses
    assert fastpath.decision_agreement(ref, flipped, 0.5) == pytest.approx(5 / 6)
    # per-label thresholds: label 1 at 0.05 makes every label-1 decision positive in both
    assert fastpath.decision_agreement(ref, flipped, np.array([0.5, 0.05])) == pytest.approx(5 / 6)
    assert fastpath.decision_agreement(ref, flipped, np.array([0.3, 0.5])) == 1.0
    with pytest.raises(ValueError, match="equal"):
        fastpath.decision_agreement(ref, ref[:2], 0.5)


def test_choose_takes_the_fastest_path_that_meets_the_bar() -> None:
    c = fastpath.CandidateResult
    cands = {
        "torch-fp32": c("torch-fp32", 1.0, 10.0, 0.0, 0),
        "onnx-fp32": c("onnx-fp32", 1.0, 20.0, 1e-6, 0),
        "onnx-int8": c("onnx-int8", 0.99, 80.0, 0.05, 8),
    }
    name, reason = fastpath.choose(cands, 0.995)
    assert name == "onnx-fp32" and "onnx-int8 99.0000%" in reason
    assert fastpath.choose(cands, 0.98)[0] == "onnx-int8"
    name, reason = fastpath.choose(cands, 1.01)
    assert name == "torch-fp32" and "no faster path" in reason


def _select(net, imgs, thr, root: Path, calls: list[int], **kw):  # type: ignore[no-untyped-def]
    def sample(n: int) -> np.ndarray:
        calls.append(n)
        return imgs[:n]

    return fastpath.select_scorer(
        net, mean=MEAN, std=STD, img_size=SIZE, thresholds=thr, model_sha256=kw.pop("sha", SHA),
        sample=sample, root=root, threads=1, **{"precision": "auto", **kw},
    )  # fmt: skip


def test_auto_uses_a_checked_fast_path_and_records_it(tmp_path: Path) -> None:
    net, imgs = tiny_net(), images(fastpath.N_CALIBRATION + fastpath.N_CHECK)
    thr = thresholds_for(net, imgs)
    calls: list[int] = []
    sel = _select(net, imgs, thr, tmp_path, calls, bar=0.9)
    record = sel.record
    assert record is not None and calls == [len(imgs)]
    assert set(record.candidates) >= {"torch-fp32", "onnx-fp32", "onnx-int8"}
    assert record.candidates["onnx-fp32"].agreement >= 0.99
    assert sel.name == record.chosen and sel.name != "torch-fp32"
    assert record.candidates[sel.name].agreement >= 0.9
    # the recorded agreement is what decision_agreement says on the check images
    check = imgs[fastpath.N_CALIBRATION :]
    ref = TorchScorer(net, mean=MEAN, std=STD, n_labels=4).score_batch(check)
    int8 = fastpath.make_scorer("onnx-int8", record, net, mean=MEAN, std=STD, n_labels=4,
                                root=tmp_path, threads=1)  # fmt: skip
    assert record.candidates["onnx-int8"].agreement == pytest.approx(
        fastpath.decision_agreement(ref, int8.score_batch(check), thr)
    )
    saved = json.loads((fastpath.record_dir(SHA, tmp_path) / fastpath.RECORD_FILE).read_text())
    assert saved["model_sha256"] == SHA and saved["chosen"] == sel.name
    assert saved["extra"]["batch_size"] == fastpath.CHECK_BATCH  # timed at the tagger's size
    # second use: from the cache, no sampling, same choice
    again = _select(net, imgs, thr, tmp_path, calls, bar=0.9)
    assert calls == [len(imgs)] and again.name == sel.name


def test_auto_falls_back_to_torch_fp32_below_the_bar(tmp_path: Path) -> None:
    net, imgs = tiny_net(), images(fastpath.N_CALIBRATION + fastpath.N_CHECK)
    sel = _select(net, imgs, thresholds_for(net, imgs), tmp_path, [], bar=1.01)
    assert sel.name == "torch-fp32" and "no faster path" in sel.reason
    assert isinstance(sel.scorer, TorchScorer) and sel.scorer.precision == "fp32"
    # int8 asked for explicitly is honoured (and only logged as below the bar)
    forced = _select(net, imgs, thresholds_for(net, imgs), tmp_path, [], precision="int8",
                     bar=1.01)  # fmt: skip
    assert forced.name == "onnx-int8" and isinstance(forced.scorer, fastpath.OrtScorer)


def test_too_few_images_means_fp32_for_auto_and_an_error_for_int8(tmp_path: Path) -> None:
    net, imgs = tiny_net(), images(10)
    sel = _select(net, imgs, 0.5, tmp_path, [])
    assert sel.name == "torch-fp32" and "too few" in sel.reason and sel.record is None
    with pytest.raises(fastpath.FastPathError, match="int8"):
        _select(net, imgs, 0.5, tmp_path, [], precision="int8")


def test_cache_is_keyed_by_sha_and_a_changed_onnx_file_is_rebuilt(tmp_path: Path) -> None:
    net, imgs = tiny_net(), images(fastpath.N_CALIBRATION + fastpath.N_CHECK)
    thr = thresholds_for(net, imgs)
    calls: list[int] = []
    _select(net, imgs, thr, tmp_path, calls)
    assert fastpath.load_record(SHA, tmp_path) is not None
    assert fastpath.load_record("cd" * 32, tmp_path) is None  # another model: no record
    folder = fastpath.record_dir(SHA, tmp_path)
    int8 = folder / fastpath.INT8_ONNX
    int8.write_bytes(int8.read_bytes()[:-10] + b"0123456789")  # tampered in place
    assert fastpath.load_record(SHA, tmp_path) is None
    sel = _select(net, imgs, thr, tmp_path, calls)  # rebuilt, from a fresh sample
    assert len(calls) == 2 and sel.record is not None
    assert fastpath.sha256_file(int8) == sel.record.candidates["onnx-int8"].sha256
    assert fastpath.load_record(SHA, tmp_path) is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-model")
    return register_tiny_model(root / "home", root / "work")


def test_load_tagger_fp32_stays_torch_eager_and_auto_checks_a_fast_path(
    tiny: TinyModel, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_images(src, fastpath.N_CALIBRATION + fastpath.N_CHECK)
    base = {"home": str(tiny.home), "batch_size": 16, "decode_workers": 1}
    exact = tagging.load_tagger(TagParams(source=str(src), precision="fp32", **base))
    assert type(exact.scorer) is TorchScorer and exact.scorer.precision == "fp32"
    auto = tagging.load_tagger(TagParams(source=str(src), precision="auto", **base))
    record = fastpath.load_record(tiny_sha(tiny))
    assert record is not None  # built from the source's images and cached
    assert auto.precision_choice.startswith(record.chosen)
    imgs = tagging.sample_images(str(src), auto.decode, 40)
    assert imgs is not None
    decisions = fastpath.decision_agreement(
        exact.scorer.score_batch(imgs), auto.scorer.score_batch(imgs), auto.thresholds
    )
    if record.chosen != "torch-fp32":
        assert record.candidates[record.chosen].agreement >= fastpath.DEFAULT_AGREEMENT_BAR
        assert decisions >= 0.95
    else:
        assert decisions == 1.0


def tiny_sha(tiny: TinyModel) -> str:
    from multitag import registry

    return registry.load_model(str(tiny.home), tiny.version).sha256
