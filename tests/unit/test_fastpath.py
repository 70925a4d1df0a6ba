"""Fast CPU scorers: ONNX export matches torch, agreement is counted right, the auto policy
falls back to fp32 below the bar, the cache is keyed by the model's sha256 and never loads a
changed file, and precision=fp32 stays torch eager."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from multitag._compat import torch as torch_compat
from multitag.config import TagParams
from multitag.inference import (
    agreement,
    arrays,
    cpu,
    loading,
    measure,
    onnx_export,
    records,
    scorers,
    selection,
)
from multitag.inference import tagger as tg
from multitag.inference.aoti import AotiScorer, PackageRunner
from multitag.inference.torch_scorer import TorchScorer
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
    path = onnx_export.export_onnx(net, tmp_path / "m.onnx", SIZE)
    ort_probs = scorers.OrtScorer(path, mean=MEAN, std=STD, n_labels=4, threads=1).score_batch(imgs)
    ref = TorchScorer(net, mean=MEAN, std=STD, n_labels=4).score_batch(imgs)
    assert ort_probs.dtype == np.float32 and ort_probs.shape == (20, 4)
    np.testing.assert_allclose(ort_probs, ref, atol=1e-4)
    # dynamic batch axis: a batch of 1 and of 7 work with the same file
    one = scorers.OrtScorer(path, mean=MEAN, std=STD, n_labels=4, threads=1)
    np.testing.assert_allclose(one.score_batch(imgs[:1]), ref[:1], atol=1e-4)
    np.testing.assert_allclose(one.score_batch(imgs[3:10]), ref[3:10], atol=1e-4)


def test_onnx_scorer_refuses_a_model_for_another_vocab(tmp_path: Path) -> None:
    path = onnx_export.export_onnx(tiny_net(), tmp_path / "m.onnx", SIZE)
    scorer = scorers.OrtScorer(path, mean=MEAN, std=STD, n_labels=5, threads=1)
    with pytest.raises(records.FastPathError, match="model and vocab"):
        scorer.score_batch(images(2))


def test_int8_quantises_the_body_and_keeps_the_classifier_head_in_fp32(tmp_path: Path) -> None:
    import onnx

    net, imgs = tiny_net(), images(32)
    fp32 = onnx_export.export_onnx(net, tmp_path / "m.onnx", SIZE)
    head = onnx_export.head_nodes(fp32)
    assert len(head) == 1  # the Linear after the last Conv; the Convs are the body
    int8 = onnx_export.quantize_int8(fp32, tmp_path / "q.onnx",
                                  arrays.normalise_batch(imgs, MEAN, STD))  # fmt: skip
    graph = onnx.load(str(int8)).graph
    made_by = {out: n for n in graph.node for out in n.output}
    inits = {i.name for i in graph.initializer}

    def weight_source(node: onnx.NodeProto) -> str:
        w = node.input[1]
        return "initializer" if w in inits else made_by[w].op_type

    convs = [n for n in graph.node if n.op_type == "Conv"]
    heads = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    assert len(convs) == 2 and len(heads) == 1
    assert all(weight_source(n) == "DequantizeLinear" for n in convs)  # int8 weights
    assert weight_source(heads[0]) == "initializer"  # fp32 weights, untouched
    ref = TorchScorer(net, mean=MEAN, std=STD, n_labels=4).score_batch(imgs)
    probs = scorers.OrtScorer(int8, mean=MEAN, std=STD, n_labels=4, threads=1).score_batch(imgs)
    assert np.max(np.abs(probs - ref)) < 0.05  # quantised, yet close to fp32


def test_a_network_without_convolutions_has_no_head_to_exclude(tmp_path: Path) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 16), nn.ReLU(), nn.Linear(16, 4))
    path = onnx_export.export_onnx(mlp.eval(), tmp_path / "mlp.onnx", SIZE)
    assert onnx_export.head_nodes(path) == []


def test_decision_agreement_counts_image_label_decisions() -> None:
    ref = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], np.float32)
    same = ref + 0.01  # moves scores, never across a 0.5 threshold
    assert agreement.decision_agreement(ref, same, 0.5) == 1.0
    flipped = ref.copy()
    flipped[1, 0] = 0.45  # one of six decisions crosses
    assert agreement.decision_agreement(ref, flipped, 0.5) == pytest.approx(5 / 6)
    # per-label thresholds: label 1 at 0.05 makes every label-1 decision positive in both
    assert agreement.decision_agreement(ref, flipped, np.array([0.5, 0.05])) == pytest.approx(5 / 6)
    assert agreement.decision_agreement(ref, flipped, np.array([0.3, 0.5])) == 1.0
    with pytest.raises(ValueError, match="equal"):
        agreement.decision_agreement(ref, ref[:2], 0.5)


def test_choose_takes_the_fastest_path_that_meets_the_bar() -> None:
    c = records.CandidateResult
    cands = {
        "torch-fp32": c("torch-fp32", 1.0, 10.0, 0.0, 0),
        "onnx-fp32": c("onnx-fp32", 1.0, 20.0, 1e-6, 0),
        "onnx-int8": c("onnx-int8", 0.99, 80.0, 0.05, 8),
    }
    name, reason = agreement.choose(cands, 0.995)
    assert name == "onnx-fp32" and "onnx-int8 99.0000%" in reason
    assert agreement.choose(cands, 0.98)[0] == "onnx-int8"
    name, reason = agreement.choose(cands, 1.01)
    assert name == "torch-fp32" and "no faster path" in reason


def _select(net, imgs, thr, root: Path, calls: list[int], **kw):  # type: ignore[no-untyped-def]
    def sample(n: int) -> np.ndarray:
        calls.append(n)
        return imgs[:n]

    return selection.select_scorer(
        net, mean=MEAN, std=STD, img_size=SIZE, thresholds=thr, model_sha256=kw.pop("sha", SHA),
        sample=sample, root=root, threads=1, **{"precision": "auto", **kw},
    )  # fmt: skip


def test_auto_uses_a_checked_fast_path_and_records_it(tmp_path: Path) -> None:
    net, imgs = tiny_net(), images(selection.N_CALIBRATION + selection.N_CHECK)
    thr = thresholds_for(net, imgs)
    calls: list[int] = []
    sel = _select(net, imgs, thr, tmp_path, calls, bar=0.9)
    record = sel.record
    assert record is not None and calls == [len(imgs)]
    assert set(record.candidates) >= {"torch-fp32", "onnx-fp32", "onnx-int8"}
    assert record.candidates["onnx-fp32"].agreement >= 0.99
    # The fastest candidate that meets the bar wins; which one that is depends on timing on
    # this (shared) machine, so assert the rule, not a name.
    meeting = [c for c in record.candidates.values()
               if c.name == "torch-fp32" or c.agreement >= 0.9]  # fmt: skip
    assert sel.name == record.chosen == max(meeting, key=lambda c: c.images_per_s).name
    assert record.candidates[sel.name].agreement >= 0.9
    # the recorded agreement is what decision_agreement says on the check images
    check = imgs[selection.N_CALIBRATION :]
    ref = TorchScorer(net, mean=MEAN, std=STD, n_labels=4).score_batch(check)
    int8 = scorers.make_scorer("onnx-int8", record, net, mean=MEAN, std=STD, n_labels=4,
                                root=tmp_path, threads=1)  # fmt: skip
    assert record.candidates["onnx-int8"].agreement == pytest.approx(
        agreement.decision_agreement(ref, int8.score_batch(check), thr)
    )
    saved = json.loads((records.record_dir(SHA, tmp_path) / records.RECORD_FILE).read_text())
    assert saved["model_sha256"] == SHA and saved["chosen"] == sel.name
    assert saved["extra"]["batch_size"] == measure.CHECK_BATCH  # timed at the tagger's size
    # second use: from the cache, no sampling, same choice
    again = _select(net, imgs, thr, tmp_path, calls, bar=0.9)
    assert calls == [len(imgs)] and again.name == sel.name


def test_auto_falls_back_to_torch_fp32_below_the_bar(tmp_path: Path) -> None:
    net, imgs = tiny_net(), images(selection.N_CALIBRATION + selection.N_CHECK)
    sel = _select(net, imgs, thresholds_for(net, imgs), tmp_path, [], bar=1.01)
    assert sel.name == "torch-fp32" and "no faster path" in sel.reason
    assert isinstance(sel.scorer, TorchScorer) and sel.scorer.precision == "fp32"
    # int8 asked for explicitly is honoured (and only logged as below the bar)
    forced = _select(net, imgs, thresholds_for(net, imgs), tmp_path, [], precision="int8",
                     bar=1.01)  # fmt: skip
    assert forced.name == "onnx-int8" and isinstance(forced.scorer, scorers.OrtScorer)


def test_too_few_images_means_fp32_for_auto_and_an_error_for_int8(tmp_path: Path) -> None:
    net, imgs = tiny_net(), images(10)
    sel = _select(net, imgs, 0.5, tmp_path, [])
    assert sel.name == "torch-fp32" and "too few" in sel.reason and sel.record is None
    with pytest.raises(records.FastPathError, match="int8"):
        _select(net, imgs, 0.5, tmp_path, [], precision="int8")


def test_cache_is_keyed_by_sha_and_a_changed_onnx_file_is_rebuilt(tmp_path: Path) -> None:
    net, imgs = tiny_net(), images(selection.N_CALIBRATION + selection.N_CHECK)
    thr = thresholds_for(net, imgs)
    calls: list[int] = []
    _select(net, imgs, thr, tmp_path, calls)
    assert records.load_record(SHA, tmp_path) is not None
    assert records.load_record("cd" * 32, tmp_path) is None  # another model: no record
    folder = records.record_dir(SHA, tmp_path)
    int8 = folder / records.INT8_ONNX
    int8.write_bytes(int8.read_bytes()[:-10] + b"0123456789")  # tampered in place
    assert records.load_record(SHA, tmp_path) is None
    sel = _select(net, imgs, thr, tmp_path, calls)  # rebuilt, from a fresh sample
    assert len(calls) == 2 and sel.record is not None
    assert records.sha256_file(int8) == sel.record.candidates["onnx-int8"].sha256
    assert records.load_record(SHA, tmp_path) is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-model")
    return register_tiny_model(root / "home", root / "work")


def test_load_tagger_fp32_stays_torch_eager_and_auto_checks_a_fast_path(
    tiny: TinyModel, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_images(src, selection.N_CALIBRATION + selection.N_CHECK)
    base = {"home": str(tiny.home), "batch_size": 16, "decode_workers": 1}
    exact = loading.load_tagger(TagParams(source=str(src), precision="fp32", **base))
    assert type(exact.scorer) is TorchScorer and exact.scorer.precision == "fp32"
    auto = loading.load_tagger(TagParams(source=str(src), precision="auto", **base))
    record = records.load_record(tiny_sha(tiny))
    assert record is not None  # built from the source's images and cached
    assert auto.precision_choice.startswith(record.chosen)
    imgs = loading.sample_images(str(src), auto.decode, 40)
    assert imgs is not None
    decisions = agreement.decision_agreement(
        exact.scorer.score_batch(imgs), auto.scorer.score_batch(imgs), auto.thresholds
    )
    if record.chosen != "torch-fp32":
        assert record.candidates[record.chosen].agreement >= records.DEFAULT_AGREEMENT_BAR
        assert decisions >= 0.95
    else:
        assert decisions == 1.0


def _big_photos(folder: Path, n: int) -> list[Path]:
    """Blocky, noisy 400x300 JPEGs: at least 6x the tiny model's input, so the default decode
    scales them down and its pixels differ from a full decode."""
    from PIL import Image

    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        grid = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(grid).resize((400, 300), Image.Resampling.NEAREST))
        noisy = np.clip(img.astype(np.int16) + rng.integers(-30, 31, img.shape), 0, 255)
        paths.append(folder / f"photo_{i:02d}.jpg")
        Image.fromarray(noisy.astype(np.uint8)).save(paths[-1], "JPEG", quality=90)
    return paths


def test_precision_fp32_is_exact_fastai_get_preds_scores_on_big_photos(
    tiny: TinyModel, tmp_path: Path
) -> None:
    from multitag import registry

    files = _big_photos(tmp_path / "src", 12)
    base = {"source": str(files[0].parent), "home": str(tiny.home), "batch_size": 16}
    exact = loading.load_tagger(TagParams(precision="fp32", decode_workers=1, **base))
    assert exact.draft is False and "exact decode" in exact.scorer_note  # in the manifest
    bf16 = loading.load_tagger(TagParams(precision="bf16", **base))
    assert bf16.draft is True and "exact" not in bf16.scorer_note

    def scores(tagger: tg.Tagger) -> np.ndarray:
        rows = [r for b in tagger.tag([str(f) for f in files]) for r in b.rows]
        return np.array([[r.scores[v] for v in tagger.vocab] for r in rows])

    learn = registry.load_model(str(tiny.home), tiny.version).learner
    with learn.no_bar():
        expected, _ = learn.get_preds(dl=learn.dls.test_dl(files))
    off = np.abs(scores(exact) - expected.numpy()).max()
    exact.draft = True  # the reduced-scale decode: what the exact mode must not do
    drafted_off = np.abs(scores(exact) - expected.numpy()).max()
    # Same 12-image batch both ways, but fastai normalises on tensors and we from numpy: the
    # kernels may round differently on another x86 (AMD vs Intel); 4e-6 still tells the exact
    # decode (6e-8 measured) from the reduced-scale one (3.4e-5).
    assert off < 4e-6 and drafted_off > 1e-5


def tiny_sha(tiny: TinyModel) -> str:
    from multitag import registry

    return registry.load_model(str(tiny.home), tiny.version).sha256


# ============================================== cached ONNX fast path: no unpickling at all


def _set_candidate(sha: str, name: str, **fields: float) -> None:
    """Edit the cached record (fastpath.json is data; only the ONNX files are sha-pinned)."""
    path = records.record_dir(sha) / records.RECORD_FILE
    data = json.loads(path.read_text())
    data["candidates"][name].update(fields)
    path.write_text(json.dumps(data))


class _CountingLoader:
    """Wraps learner.load_learner_file: counts unpickles, or refuses them."""

    def __init__(self, original, refuse: bool) -> None:  # type: ignore[no-untyped-def]
        self.original, self.refuse, self.calls = original, refuse, 0

    def __call__(self, path: Path, cpu: bool = True):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.refuse:
            raise AssertionError(f"the learner {path} was unpickled")
        return self.original(path, cpu)


def _tag(tagger: tg.Tagger, uris: list[str]) -> np.ndarray:
    rows = [row for batch in tagger.tag(uris) for row in batch.rows]
    assert all(r.error is None for r in rows)
    return np.array([[r.scores[v] for v in tagger.vocab] for r in rows])  # type: ignore[index]


def test_a_passing_cached_onnx_path_tags_without_unpickling_the_learner(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multitag import registry
    from multitag.training import learner

    src = tmp_path / "src"
    write_images(src, selection.N_CALIBRATION + selection.N_CHECK)
    params = TagParams(source=str(src), precision="auto", home=str(tiny.home), batch_size=16,
                       decode_workers=1)  # fmt: skip
    exact = loading.load_tagger(params.model_copy(update={"precision": "fp32"}))
    loading.load_tagger(params)  # first use: full load, builds and checks the record
    sha = registry.load_metadata(str(tiny.home)).sha256
    record = records.load_record(sha)
    assert record is not None and record.candidates["onnx-fp32"].agreement >= 0.995
    _set_candidate(sha, "onnx-fp32", images_per_s=1e9)  # the fastest, whatever this CPU says
    loader = _CountingLoader(learner.load_learner_file, refuse=True)
    monkeypatch.setattr(learner, "load_learner_file", loader)
    fast = loading.load_tagger(params)
    assert loader.calls == 0
    assert isinstance(fast.scorer, scorers.OrtScorer) and fast.scorer.precision == "onnx-fp32"
    assert "learner not unpickled" in fast.precision_choice
    assert fast.model_version == tiny.version and fast.vocab == exact.vocab
    assert fast.thresholds.to_json() == exact.thresholds.to_json()
    uris = sorted(str(p) for p in src.iterdir())[:40]
    np.testing.assert_allclose(_tag(fast, uris), _tag(exact, uris), atol=1e-4)
    # and a fresh process (as `multitag tag` is) never even imports fastai
    code = (
        "import sys; from multitag.inference import loading; "
        "from multitag.config import TagParams; "
        f"t = loading.load_tagger(TagParams.model_validate_json({params.model_dump_json()!r})); "
        "print(type(t.scorer).__name__, 'fastai' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["OrtScorer", "False"], out.stderr[-2000:]


def test_without_a_passing_onnx_record_the_learner_is_loaded(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multitag import registry
    from multitag.training import learner

    src = tmp_path / "src"
    write_images(src, selection.N_CALIBRATION + selection.N_CHECK)
    params = TagParams(source=str(src), precision="auto", home=str(tiny.home), batch_size=16,
                       decode_workers=1)  # fmt: skip
    loader = _CountingLoader(learner.load_learner_file, refuse=False)
    monkeypatch.setattr(learner, "load_learner_file", loader)
    loading.load_tagger(params)  # no record yet: full load
    assert loader.calls == 1
    sha = registry.load_metadata(str(tiny.home)).sha256
    for name in ("onnx-fp32", "onnx-int8"):  # both ONNX paths below the bar
        _set_candidate(sha, name, agreement=0.9, images_per_s=1e9)
    tagger = loading.load_tagger(params)
    assert loader.calls == 2 and not isinstance(tagger.scorer, scorers.OrtScorer)
    # precision=fp32 never looks at the cache
    _set_candidate(sha, "onnx-fp32", agreement=1.0)
    loading.load_tagger(params.model_copy(update={"precision": "fp32"}))
    assert loader.calls == 3
    # a cached ONNX file that changed is never loaded: full load (and a rebuilt record)
    onnx = records.record_dir(sha) / records.FP32_ONNX
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    assert records.load_record(sha) is None
    loading.load_tagger(params)
    assert loader.calls == 4


def test_a_tampered_model_file_is_refused_even_with_a_cached_fast_path(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from multitag import registry
    from multitag.training import learner

    home = tmp_path / "home"
    shutil.copytree(tiny.home, home)
    src = tmp_path / "src"
    write_images(src, selection.N_CALIBRATION + selection.N_CHECK)
    params = TagParams(source=str(src), precision="auto", home=str(home), batch_size=16,
                       decode_workers=1)  # fmt: skip
    loading.load_tagger(params)
    sha = registry.load_metadata(str(home)).sha256
    _set_candidate(sha, "onnx-fp32", images_per_s=1e9)
    model = home / "models" / tiny.version / "model.pkl"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    loader = _CountingLoader(learner.load_learner_file, refuse=True)
    monkeypatch.setattr(learner, "load_learner_file", loader)
    with pytest.raises(registry.IntegrityError, match=r"model\.pkl"):
        loading.load_tagger(params)
    with pytest.raises(registry.IntegrityError, match=r"model\.pkl"):
        registry.load_metadata(str(home))
    assert loader.calls == 0


# ============================================ export-time fast path, recorded with the model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-exported")
    return register_tiny_model(root / "home", root / "work", with_fastpath=True)


def test_the_fast_path_is_checked_on_validation_at_export_and_registered(
    exported: TinyModel,
) -> None:
    from multitag import registry
    from multitag.training.learner import read_training_table

    registry.verify_version(str(exported.home), exported.version)  # ONNX files are covered
    meta = registry.load_metadata(str(exported.home), exported.version)
    assert {"fastpath.json", "model.fp32.onnx", "model.int8.onnx"} <= set(meta.sums)
    assert meta.fastpath is not None
    record = records.FastPathRecord.from_json(meta.fastpath)
    table = read_training_table(exported.home.parent / "work" / "shapes")
    assert record.n_check == int(table["is_valid"].sum())  # every validation image
    assert record.extra["check_set"] == "validation"
    assert record.model_sha256 == meta.sha256
    for name in ("onnx-fp32", "onnx-int8"):
        cand = record.candidates[name]
        assert cand.sha256 == meta.sums[str(cand.file)]
    assert record.candidates["onnx-fp32"].agreement == 1.0
    assert exported.metrics["fastpath"]["chosen"] == record.chosen


def _tag_in_a_fresh_process(params: TagParams, *, report: str, prelude: str = "") -> str:
    """Tag `params.source` in a new Python process; stdout of `print(<report>)`, where `t`
    is the tagger and `rows` the rows."""
    code = (
        "import sys; from multitag.inference import loading, selection; "
        f"from multitag.config import TagParams; {prelude}"
        f"t = loading.load_tagger(TagParams.model_validate_json({params.model_dump_json()!r})); "
        "rows = [r for b in t.tag(sorted(str(p) for p in __import__('pathlib').Path("
        f"{params.source!r}).iterdir())) for r in b.rows]; "
        f"print({report})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_int8_runs_from_the_registry_without_torch_fastai_or_unpickling(
    exported: TinyModel, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_images(src, 12)  # too few for a check at tag time: the export-time record is used
    params = TagParams(source=str(src), precision="int8", home=str(exported.home),
                       batch_size=16, decode_workers=1)  # fmt: skip
    first, choice = _tag_in_a_fresh_process(
        params,
        report="type(t.scorer).__name__, t.scorer.precision, len(rows), "
        "'fastai' in sys.modules, 'torch' in sys.modules); print(t.precision_choice",
    ).splitlines()[:2]
    assert first.split() == ["OrtScorer", "onnx-int8", "12", "False", "False"]
    assert "validation images" in choice and "learner not unpickled" in choice


def test_auto_follows_the_export_record_and_never_rechecks(
    exported: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multitag import registry

    src = tmp_path / "src"
    write_images(src, selection.N_CALIBRATION + selection.N_CHECK)  # enough for a tag-time check
    params = TagParams(source=str(src), precision="auto", home=str(exported.home),
                       batch_size=16, decode_workers=1)  # fmt: skip

    def no_check(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the fast path was checked again at tag time")

    monkeypatch.setattr(measure, "build_record", no_check)
    tagger = loading.load_tagger(params)
    record = records.FastPathRecord.from_json(
        registry.load_metadata(str(exported.home)).fastpath or {}
    )
    expected, _ = selection.choose_for_run(record, "auto", records.DEFAULT_AGREEMENT_BAR)
    assert tagger.precision_choice.startswith(expected)
    assert records.load_record(record.model_sha256) is None  # nothing cached: not needed
    exact = loading.load_tagger(params.model_copy(update={"precision": "fp32"}))
    uris = sorted(str(p) for p in src.iterdir())[:48]
    agree = agreement.decision_agreement(_tag(exact, uris), _tag(tagger, uris), tagger.thresholds)
    assert agree >= 0.97  # a few flips at most on unseen noise images


def test_a_tampered_registry_onnx_file_is_refused(exported: TinyModel, tmp_path: Path) -> None:
    import shutil

    from multitag import registry

    home = tmp_path / "home"
    shutil.copytree(exported.home, home)
    onnx = home / "models" / exported.version / "model.int8.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    params = TagParams(source=str(tmp_path), precision="int8", home=str(home))
    with pytest.raises(registry.IntegrityError, match=r"model\.int8\.onnx"):
        loading.load_tagger(params)


def test_choose_for_run_skips_bf16_without_native_support(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cands = {
        "torch-fp32": records.CandidateResult("torch-fp32", 1.0, 10.0, 0.0, 0),
        "onnx-fp32": records.CandidateResult("onnx-fp32", 1.0, 20.0, 0.0, 0, "a", "x"),
        "onnx-int8": records.CandidateResult("onnx-int8", 0.99, 90.0, 0.1, 9, "b", "y"),
        "torch-bf16": records.CandidateResult("torch-bf16", 0.999, 50.0, 0.01, 1),
    }
    record = records.FastPathRecord(SHA, {}, "", 0.995, 8, 100, 4, cands, "torch-bf16", "", 1.0)
    monkeypatch.setattr(cpu, "bf16_supported", lambda: True)
    assert selection.choose_for_run(record, "auto", 0.995)[0] == "torch-bf16"
    monkeypatch.setattr(cpu, "bf16_supported", lambda: False)
    name, reason = selection.choose_for_run(record, "auto", 0.995)
    assert name == "onnx-fp32" and "no native bf16" in reason
    assert selection.choose_for_run(record, "int8", 0.995)[0] == "onnx-int8"  # even below the bar


def _forced_registry_pick(
    exported: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> tuple[tg.Tagger, TagParams]:
    """A tagger forced onto the registered candidate `name`, its scores checked against fp32
    and the learner never unpickled; and the params that built it."""
    from multitag.training import learner

    src = tmp_path / "src"
    write_images(src, 24)
    params = TagParams(source=str(src), precision="auto", home=str(exported.home),
                       batch_size=16, decode_workers=2)  # fmt: skip
    exact = loading.load_tagger(params.model_copy(update={"precision": "fp32"}))
    monkeypatch.setattr(selection, "choose_for_run", lambda *a: (name, "forced"))
    monkeypatch.setattr(learner, "load_learner_file",
                        _CountingLoader(learner.load_learner_file, refuse=True))  # fmt: skip
    fast = loading.load_tagger(params)
    assert "learner not unpickled" in fast.precision_choice
    uris = sorted(str(p) for p in src.iterdir())
    np.testing.assert_allclose(_tag(fast, uris), _tag(exact, uris), atol=0.05)
    return fast, params


def _a_changed_file_is_refused(
    exported: TinyModel, tmp_path: Path, params: TagParams, name: str
) -> None:
    """The registered file `name`, changed by a byte, is refused before anything reads it."""
    import shutil

    from multitag import registry

    home = tmp_path / "home"
    shutil.copytree(exported.home, home)
    changed = home / "models" / exported.version / name
    changed.write_bytes(changed.read_bytes() + b"\0")
    with pytest.raises(registry.IntegrityError, match=re.escape(name)):
        loading.load_tagger(params.model_copy(update={"home": str(home)}))


def test_a_bf16_pick_runs_the_registered_torch_program_without_unpickling(
    exported: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multitag import registry

    meta = registry.load_metadata(str(exported.home), exported.version)
    record = records.FastPathRecord.from_json(meta.fastpath or {})
    if not cpu.bf16_supported():
        pytest.skip("this CPU has no native bf16: no bf16 candidate was recorded")
    bf16 = record.candidates["torch-bf16"]
    assert bf16.file == "model.pt2" and bf16.sha256 == meta.sums["model.pt2"]
    fast, params = _forced_registry_pick(exported, tmp_path, monkeypatch, "torch-bf16")
    assert isinstance(fast.scorer, TorchScorer) and fast.scorer.precision == "bf16"
    # a changed program file is refused before torch.export.load reads it
    _a_changed_file_is_refused(exported, tmp_path, params, "model.pt2")


def test_gcc_isa_options_become_linux_cpu_flags() -> None:
    opts = "-mavx512f -mavx512dq -mavx512vl -mfma -mavx512vnni -mamx-tile -mavx512bf16 -O3"
    assert cpu.isa_flags(opts) == [
        "amx_tile", "avx512_bf16", "avx512_vnni", "avx512dq", "avx512f", "avx512vl", "fma",
    ]  # fmt: skip
    assert cpu.isa_flags("") == []


def _compiled_record(requires: list[str], torch_version: str) -> records.FastPathRecord:
    cands = {
        "torch-fp32": records.CandidateResult("torch-fp32", 1.0, 10.0, 0.0, 0),
        "onnx-int8": records.CandidateResult("onnx-int8", 0.999, 90.0, 0.1, 1, "b", "y"),
        "aoti-bf16": records.CandidateResult("aoti-bf16", 1.0, 300.0, 0.01, 0, "c", "z", requires),
    }
    return records.FastPathRecord(SHA, {"torch": torch_version}, "", 0.995, 8, 100, 4, cands,
                                   "aoti-bf16", "", 1.0)  # fmt: skip


def test_a_compiled_candidate_runs_only_on_a_cpu_and_torch_it_was_built_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setattr(cpu, "bf16_supported", lambda: True)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx512f", "fma", "amx_tile"})
    ok = _compiled_record(["avx512f", "fma"], torch.__version__)
    name, reason = selection.choose_for_run(ok, "auto", 0.995)
    assert name == "aoti-bf16" and "skipped" not in reason
    # built on a CPU with AMX-BF16, tagging on one without: SIGILL if loaded, so never loaded
    amx = _compiled_record(["amx_bf16", "avx512f"], torch.__version__)
    name, reason = selection.choose_for_run(amx, "auto", 0.995)
    assert name == "onnx-int8" and "aoti-bf16 skipped" in reason and "amx_bf16" in reason
    other_torch = _compiled_record(["avx512f"], "2.0.0")
    name, reason = selection.choose_for_run(other_torch, "auto", 0.995)
    assert name == "onnx-int8" and "compiled for torch 2.0.0" in reason
    monkeypatch.setattr(cpu, "cpu_flags", lambda: None)  # not Linux: flags unknown
    assert selection.choose_for_run(ok, "auto", 0.995)[0] == "onnx-int8"
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx512f", "fma"})
    monkeypatch.setattr(cpu, "bf16_supported", lambda: False)
    assert selection.choose_for_run(ok, "auto", 0.995)[0] == "onnx-int8"


def _a_cxx_compiler() -> bool:
    import os
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def test_a_compiled_bf16_pick_runs_from_the_registry_without_unpickling(
    exported: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from multitag import registry

    if not cpu.bf16_supported():
        pytest.skip("this CPU has no native bf16: no compiled bf16 candidate was built")
    meta = registry.load_metadata(str(exported.home), exported.version)
    record = records.FastPathRecord.from_json(meta.fastpath or {})
    if "aoti-bf16" not in record.candidates and not _a_cxx_compiler():
        pytest.skip("no C++ compiler: the compiled candidate cannot be built here")
    aoti = record.candidates["aoti-bf16"]  # built at export, checked like the others
    assert aoti.file == "model.bf16.aoti.pt2" and aoti.sha256 == meta.sums[aoti.file]
    assert aoti.requires and set(aoti.requires) <= (cpu.cpu_flags() or set())
    assert selection.unusable_here(record, "aoti-bf16") is None
    fast, params = _forced_registry_pick(exported, tmp_path, monkeypatch, "aoti-bf16")
    assert isinstance(fast.scorer, AotiScorer)
    # driven through its C interface (ctypes: the GIL is released, decoding overlaps), with
    # exactly the logits of libtorch's own package loader, for any batch size
    assert isinstance(fast.scorer._runner, torch_compat.CRunner)
    loader = PackageRunner(exported.home / "models" / exported.version / aoti.file)
    imgs = images(19)
    for batch in (imgs, imgs[:1]):
        logits = loader.run(batch)
        np.testing.assert_array_equal(fast.scorer._runner.run(batch), logits)
        np.testing.assert_array_equal(fast.scorer.score_batch(batch), arrays.sigmoid(logits))
        want = torch.sigmoid(torch.from_numpy(logits)).numpy()
        np.testing.assert_allclose(fast.scorer.score_batch(batch), want, rtol=0, atol=1e-6)
    # a fresh process tags with it without importing torch's Python package (~1.7 s)
    out = _tag_in_a_fresh_process(
        params,
        prelude="selection.choose_for_run = lambda *a: ('aoti-bf16', 'forced'); ",
        report="type(t.scorer._runner).__name__, len(rows), sum(r.error is None for r in rows), "
        "'torch' in sys.modules, 'fastai' in sys.modules",
    )
    assert out.split() == ["CRunner", "24", "24", "False", "False"]
    # a changed package (native code) is refused before it is loaded
    _a_changed_file_is_refused(exported, tmp_path, params, aoti.file)


def test_a_compiled_package_runs_through_the_public_loader_where_the_canary_fails(
    exported: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multitag import registry

    if not cpu.bf16_supported():
        pytest.skip("this CPU has no native bf16: no compiled bf16 candidate was built")
    meta = registry.load_metadata(str(exported.home), exported.version)
    record = records.FastPathRecord.from_json(meta.fastpath or {})
    if "aoti-bf16" not in record.candidates:
        pytest.skip("no compiled candidate was built here (no C++ compiler)")
    path = exported.home / "models" / exported.version / str(record.candidates["aoti-bf16"].file)
    fast = AotiScorer(path, n_labels=len(meta.thresholds.vocab))
    monkeypatch.setattr(torch_compat, "c_runner_canary", lambda: "a prototype changed")
    public = AotiScorer(path, n_labels=len(meta.thresholds.vocab))
    assert isinstance(public._runner, PackageRunner)  # no ctypes call was made
    imgs = images(7)
    np.testing.assert_array_equal(public.score_batch(imgs), fast.score_batch(imgs))
