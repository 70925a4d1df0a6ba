"""Training on a tiny shapes set: loss falls, export round-trips, thresholds travel."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from multitag.config import TrainParams, shapes_train_params
from multitag.data.shapes import SHAPE_CLASSES, make_shapes_dataset
from multitag.hashing import sha256_bytes
from multitag.training import checkpoints, learner

SEED = 11


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("tiny") / "shapes"
    return make_shapes_dataset(dest, n_train=160, n_test=12, img_size=32, seed=SEED)


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path) -> tuple[object, list[dict]]:
    seen: list[dict] = []
    params = shapes_train_params(img_size=32, epochs=2, batch_size=32, lr=1e-2, device="cpu")
    result = learner.train(tiny_dataset, params, on_epoch=seen.append)
    return result, seen


def _one_hot(labels: pd.Series, vocab: list[str]) -> np.ndarray:
    return np.array([[v in s.split() for v in vocab] for s in labels], dtype=bool)


# ------------------------------------------------------------------ table parsing (fast)


def _write_csv(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    (tmp_path / "train").mkdir(exist_ok=True)
    (tmp_path / "train.csv").write_bytes(text.encode(encoding))
    return tmp_path


def test_table_parsing_keeps_empty_labels_and_real_booleans(tmp_path: Path) -> None:
    text = (
        "\ufefffname,labels,is_valid,extra\r\n"
        "a.jpg,cat  dog,False,x\r\n"
        "b.jpg,,True,y\r\n"
        'c.jpg,"dog",true,z\r\n'
        "d.jpg,cat,0,w\r\n"
        "e.jpg,NA,1,v\r\n\r\n"
    )
    table = learner.read_training_table(_write_csv(tmp_path, text))
    assert list(table.columns) == ["fname", "labels", "is_valid"]
    assert table["labels"].tolist() == ["cat dog", "", "dog", "cat", "NA"]
    assert table["is_valid"].dtype == bool
    assert table["is_valid"].tolist() == [False, True, True, False, True]
    assert learner.label_vocab(table) == ["NA", "cat", "dog"]


def test_bad_is_valid_names_the_line(tmp_path: Path) -> None:
    text = "fname,labels,is_valid\na.jpg,cat,False\nb.jpg,dog,maybe\n"
    with pytest.raises(learner.TrainingError, match=r"row 3 .*'maybe'"):
        learner.read_training_table(_write_csv(tmp_path, text))


def test_missing_column_and_missing_split_are_errors(tmp_path: Path) -> None:
    with pytest.raises(learner.TrainingError, match="missing column"):
        learner.read_training_table(_write_csv(tmp_path, "fname,labels\na.jpg,cat\n"))
    with pytest.raises(learner.TrainingError, match="one validation row"):
        learner.read_training_table(
            _write_csv(tmp_path, "fname,labels,is_valid\na.jpg,cat,False\n")
        )


def test_cap_validation_only_drops_validation_rows() -> None:
    table = pd.DataFrame(
        {
            "fname": [f"{i}.jpg" for i in range(10)],
            "labels": ["a"] * 10,
            "is_valid": [i % 2 == 0 for i in range(10)],
        }
    )
    capped = learner.cap_validation(table, 2, seed=0)
    assert int(capped["is_valid"].sum()) == 2
    assert int((~capped["is_valid"]).sum()) == 5
    assert learner.cap_validation(table, None, seed=0).equals(table)


def test_resolve_arch() -> None:
    from multitag.training.models import shapes_cnn

    assert learner.resolve_arch("shapes_cnn") is shapes_cnn
    import torchvision

    assert learner.resolve_arch("resnet18") is torchvision.models.resnet18
    assert learner.resolve_arch("mobilenetv3_small_050") == "mobilenetv3_small_050"  # timm
    with pytest.raises(learner.TrainingError, match="Unknown arch 'not_a_net'"):
        learner.resolve_arch("not_a_net")


def test_shapes_params_and_overrides() -> None:
    p = shapes_train_params(epochs=3)
    assert (p.arch, p.pretrained, p.img_size, p.epochs) == ("shapes_cnn", False, 64, 3)
    with pytest.raises(ValueError):
        shapes_train_params(no_such_field=1)
    assert TrainParams().pretrained is True  # real data default


def test_shapes_cnn_keeps_resolution_and_refuses_pretrained() -> None:
    import torch

    from multitag.training.models import shapes_cnn

    net = shapes_cnn()
    x = torch.zeros(1, 3, 64, 64)
    assert net[0](x).shape[-2:] == (64, 64)  # the first block sees full resolution
    assert net[:-1](x).shape[-2:] == (8, 8)  # three 2x pools, no strided 4x stem
    assert isinstance(net[-1], torch.nn.AdaptiveAvgPool2d)  # fastai's create_body cuts here
    with pytest.raises(ValueError, match="no pretrained weights"):
        shapes_cnn(pretrained=True)


def test_mean_average_precision_skips_labels_without_positives() -> None:
    from multitag.training.models import mean_average_precision

    targets = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=bool)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.3], [0.1, 0.2]])
    assert mean_average_precision(targets, probs) == pytest.approx(1.0)
    assert np.isnan(mean_average_precision(np.zeros((3, 2), bool), np.ones((3, 2))))


# ------------------------------------------------------------------ training (tiny set)


@pytest.mark.slow
def test_loss_falls_and_every_epoch_is_reported(trained) -> None:
    result, seen = trained
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert seen == result.history
    for row in result.history:
        assert set(row) == {"epoch", "train_loss", "valid_loss", "accuracy_multi", "mAP", "time_s"}
        assert all(np.isfinite(v) for v in row.values())
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    assert result.device == "cpu"
    assert (result.n_train, result.n_valid) == (128, 32)
    assert result.vocab == sorted(SHAPE_CLASSES)


@pytest.mark.slow
def test_validation_targets_match_csv_including_empty_rows(trained, tiny_dataset: Path) -> None:
    result, _ = trained
    probs, targets = learner.predict_validation(result.learner)
    table = learner.read_training_table(tiny_dataset)
    valid = table[table["is_valid"]]
    assert probs.shape == targets.shape == (len(valid), len(result.vocab))
    assert probs.dtype == np.float32 and targets.dtype == bool
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_array_equal(targets, _one_hot(valid["labels"], result.vocab))
    empty = (valid["labels"] == "").to_numpy()
    assert empty.any(), "fixture should contain images with no shape"
    assert not targets[empty].any()


@pytest.mark.slow
def test_empty_label_encodes_to_all_zero_target(trained) -> None:
    result, _ = trained
    dsets = result.learner.dls.train_ds
    rows = [i for i in range(len(dsets.items)) if dsets.items.iloc[i]["labels"] == ""]
    assert rows
    _, target = dsets[rows[0]]
    assert target.shape == (len(result.vocab),) and float(target.sum()) == 0.0


@pytest.mark.slow
def test_inference_spec(trained) -> None:
    result, _ = trained
    spec = learner.inference_spec(result.learner)
    assert spec["img_size"] == 32
    assert spec["arch"] == "shapes_cnn"
    assert spec["vocab"] == result.vocab
    assert spec["mean"] == pytest.approx([0.485, 0.456, 0.406])  # Normalize added for random init
    assert spec["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert spec["resize_method"] == "squish"
    json.dumps(spec)  # plain JSON types only


@pytest.mark.slow
def test_export_sets_thresholds_and_rejects_bad_ones(trained, tmp_path: Path) -> None:
    import torch

    learn = trained[0].learner
    learner.export_learner(learn, tmp_path / "a.pkl", 0.4)
    assert learn.loss_func.thresh == pytest.approx(0.4)
    per_label = np.linspace(0.2, 0.7, len(learn.dls.vocab), dtype=np.float32)
    out = learner.export_learner(learn, tmp_path / "sub" / "b.pkl", per_label)
    assert out == tmp_path / "sub" / "b.pkl" and out.stat().st_size > 0
    assert torch.allclose(learn.loss_func.thresh, torch.from_numpy(per_label))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["b.pkl"]  # no temp left
    with pytest.raises(ValueError, match="one value per label"):
        learner.export_learner(learn, tmp_path / "c.pkl", np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        learner.export_learner(learn, tmp_path / "c.pkl", 1.5)
    assert not (tmp_path / "c.pkl").exists()


@pytest.mark.slow
def test_exported_learner_predicts_the_same_in_a_fresh_process(
    trained, tiny_dataset: Path, tmp_path: Path
) -> None:
    learn = trained[0].learner
    files = sorted((tiny_dataset / "test").iterdir())
    before = learner.predict_files(learn, files)
    thresholds = np.full(len(learn.dls.vocab), 0.5, dtype=np.float32)
    thresholds[0] = 0.05  # makes the decoded labels depend on the per-label value
    model = learner.export_learner(learn, tmp_path / "model.pkl", thresholds)
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from pathlib import Path
        from multitag.training.learner import load_learner_file, predict_files, inference_spec
        learn = load_learner_file(Path({str(model)!r}))
        files = [Path(p) for p in {[str(f) for f in files]!r}]
        np.save({str(tmp_path / "after.npy")!r}, predict_files(learn, files))
        with learn.no_bar():
            decoded = [learn.predict(files[0])[1].tolist(), learn.predict(files[1])[1].tolist()]
        json.dump({{"decoded": decoded, "spec": inference_spec(learn)}}, sys.stdout)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = np.load(tmp_path / "after.npy")
    np.testing.assert_allclose(after, before, atol=1e-5)
    out = json.loads(proc.stdout)
    assert out["spec"] == learner.inference_spec(learn)
    # fastai's own predict applies the exported per-label thresholds.
    assert out["decoded"] == (before[:2] > thresholds).tolist()


@pytest.mark.slow
def test_loaded_learner_has_no_validation_split(trained, tmp_path: Path) -> None:
    model = learner.export_learner(trained[0].learner, tmp_path / "m.pkl", 0.5)
    loaded = learner.load_learner_file(model)
    with pytest.raises(learner.TrainingError, match="no validation items"):
        learner.predict_validation(loaded)


def test_pretrained_offline_names_the_weights_file(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.hub

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    params = TrainParams(arch="resnet18", pretrained=True, img_size=32, epochs=1, device="cpu")
    with pytest.raises(learner.PretrainedWeightsUnavailable) as info:
        learner.train(tiny_dataset, params)
    message = str(info.value)
    assert "$TORCH_HOME/hub/checkpoints/" in message
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "pretrained=False" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


@pytest.mark.slow
def test_weights_placed_where_the_error_says_are_used_by_fine_tune(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The offline recipe works: a file under $TORCH_HOME/hub/checkpoints/ is loaded, no network.

    The file holds random weights (the real ones cannot be downloaded here); torch.hub does
    not re-check the hash of a file already in its cache, which is what makes this work.
    """
    import torch
    import torch.hub
    import torchvision

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not download when the file is in place")

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), checkpoints / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    params = TrainParams(
        arch="resnet18", pretrained=True, img_size=32, batch_size=32, epochs=1,
        freeze_epochs=1, augment="none", device="cpu",
    )  # fmt: skip
    result = learner.train(tiny_dataset, params)
    assert [row["epoch"] for row in result.history] == [1, 2]  # 1 frozen + 1 unfrozen
    assert learner.inference_spec(result.learner)["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_shapes_cnn_with_pretrained_is_refused(tiny_dataset: Path) -> None:
    params = shapes_train_params(pretrained=True, img_size=32, epochs=1)
    with pytest.raises(learner.TrainingError, match="pretrained=False"):
        learner.train(tiny_dataset, params)


def test_missing_train_folder(tmp_path: Path) -> None:
    with pytest.raises(learner.TrainingError, match="train/"):
        learner.train(tmp_path, shapes_train_params())


# --------------------------------------------------------------------------- checkpoints


class _Crash(Exception):
    """Stands in for a kill: raised from on_epoch, before that epoch's checkpoint is written."""


def _crash_at(epoch: int):
    def on_epoch(row: dict) -> None:
        if row["epoch"] == epoch:
            raise _Crash(f"crash after epoch {epoch}")

    return on_epoch


def test_checkpoint_round_trip_keeps_two_and_refuses_altered_bytes(tmp_path: Path) -> None:
    import torch

    location = checkpoints.checkpoint_location(str(tmp_path), "key")
    history: list[dict] = []
    for epoch in range(3):
        history.append({"epoch": epoch + 1, "valid_loss": 1.0 / (epoch + 1)})
        state = {"model": {"w": torch.full((2,), float(epoch))}, "opt": {"hypers": [{"lr": 0.1}]}}
        checkpoints.save_checkpoint(location, epoch, state, history, lr=np.float64(0.01))
    names = sorted(p.name for p in Path(location).iterdir())
    assert names == ["epoch-1.pt", "epoch-2.pt", "latest.json"]  # only the newest two
    ckpt = checkpoints.load_checkpoint(location)
    assert ckpt is not None and ckpt.epochs_done == 3 and ckpt.lr == 0.01
    assert [row["epoch"] for row in ckpt.history] == [1, 2, 3]
    assert torch.equal(ckpt.state["model"]["w"], torch.full((2,), 2.0))

    (Path(location) / "epoch-2.pt").write_bytes(b"not the bytes latest.json hashed")
    with pytest.raises(checkpoints.CheckpointUnusable, match="sha256"):
        checkpoints.load_checkpoint(location)
    checkpoints.clear_checkpoints(location)
    assert checkpoints.load_checkpoint(location) is None and not Path(location).exists()


def test_checkpoint_with_an_object_is_never_unpickled(tmp_path: Path) -> None:
    """A file whose sha256 matches but which holds arbitrary objects is refused by
    torch.load(weights_only=True): hashes say the bytes are unchanged, not that they are safe."""
    import io

    import torch

    location = checkpoints.checkpoint_location(str(tmp_path), "key")
    checkpoints.save_checkpoint(location, 0, {"w": torch.zeros(1)}, [{"epoch": 1}], lr=0.1)
    buf = io.BytesIO()
    torch.save({"evil": Path("/etc/passwd")}, buf)
    (Path(location) / "epoch-0.pt").write_bytes(buf.getvalue())
    latest = json.loads((Path(location) / "latest.json").read_text())
    latest["sha256"] = sha256_bytes(buf.getvalue())
    (Path(location) / "latest.json").write_text(json.dumps(latest))
    with pytest.raises(checkpoints.CheckpointUnusable, match="safely"):
        checkpoints.load_checkpoint(location)


def test_a_crashed_training_resumes_at_the_next_epoch(tiny_dataset: Path, tmp_path: Path) -> None:
    params = shapes_train_params(img_size=32, epochs=3, batch_size=32, lr=1e-2, device="cpu")
    location = str(tmp_path / "ckpt")
    with pytest.raises(_Crash):
        learner.train(tiny_dataset, params, checkpoint_dir=location, on_epoch=_crash_at(2))
    saved = checkpoints.load_checkpoint(location)
    assert saved is not None and saved.epochs_done == 1  # epoch 2 crashed before its checkpoint

    seen: list[dict] = []
    result = learner.train(tiny_dataset, params, checkpoint_dir=location, on_epoch=seen.append)
    assert result.resumed_at_epoch == 1
    assert [row["epoch"] for row in seen] == [2, 3]  # only the epochs not done before
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.history[0] == saved.history[0]
    assert all(np.isfinite(row["valid_loss"]) for row in result.history)
    final = checkpoints.load_checkpoint(location)
    assert final is not None and final.epochs_done == 3


def test_an_altered_checkpoint_trains_from_epoch_0(
    tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params = shapes_train_params(img_size=32, epochs=2, batch_size=32, lr=1e-2, device="cpu")
    location = str(tmp_path / "ckpt")
    with pytest.raises(_Crash):
        learner.train(tiny_dataset, params, checkpoint_dir=location, on_epoch=_crash_at(2))
    (tmp_path / "ckpt" / "epoch-0.pt").write_bytes(b"\0" * 64)
    with caplog.at_level("WARNING", logger="multitag.training.learner"):
        result = learner.train(tiny_dataset, params, checkpoint_dir=location)
    assert "not resuming" in caplog.text and "sha256" in caplog.text
    assert result.resumed_at_epoch == 0
    assert [row["epoch"] for row in result.history] == [1, 2]


class _FakeLearner:
    """Records what `_fit` asks of fastai, with the callbacks' phase settings at each fit."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def freeze(self) -> None:
        self.calls.append(("freeze",))

    def unfreeze(self) -> None:
        self.calls.append(("unfreeze",))

    def fit_one_cycle(self, n_epoch: int, lr: object, *, cbs: list, start_epoch: int, **kw) -> None:
        ckpt = next(cb for cb in cbs if isinstance(cb, learner._Checkpointer))
        self.calls.append(("fit", n_epoch, start_epoch, ckpt.offset, ckpt.skip_to))


@pytest.mark.parametrize(
    ("start", "frozen_fit", "unfrozen_fit"),
    [
        (0, ("fit", 2, 0, 0, 0), ("fit", 3, 0, 2, 0)),
        (1, ("fit", 2, 1, 0, 1), ("fit", 3, 0, 2, 0)),  # killed in the frozen phase
        (2, ("fit", 2, 2, 0, 2), ("fit", 3, 0, 2, 0)),  # frozen phase done
        (4, ("fit", 2, 2, 0, 2), ("fit", 3, 2, 2, 2)),  # killed in the unfrozen phase
    ],
)
def test_fine_tune_resume_splits_the_run_epoch_between_its_phases(
    start: int, frozen_fit: tuple, unfrozen_fit: tuple
) -> None:
    params = TrainParams(arch="resnet18", pretrained=True, epochs=3, freeze_epochs=2)
    fake = _FakeLearner()
    cbs = [learner._EpochReporter([], None), learner._Checkpointer("unused", [], 0.01)]
    learner._fit(fake, params, 0.01, cbs, start)
    assert fake.calls == [("freeze",), frozen_fit, ("unfreeze",), unfrozen_fit]
    assert cbs[0].skip_to == cbs[1].skip_to


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (ConnectionResetError("peer reset"), True),
        (TimeoutError("read timed out"), True),
        (OSError(28, "No space left on device"), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed."), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (FileNotFoundError("train/img_1.png"), False),
        (learner.TrainingError("train.csv has no labels at all"), False),
        (ValueError("bad value"), False),
    ],
)
def test_only_infrastructure_failures_are_retried(exc: BaseException, retry: bool) -> None:
    assert checkpoints.is_infrastructure_failure(exc) is retry


def test_train_model_task_retries_infrastructure_failures_only() -> None:
    from tasks import retrain

    class State:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def result(self) -> None:
            raise self.exc

    assert retrain.train_model.retries == 2
    assert retrain.train_model.retry_condition_fn is not None
    assert retrain.train_model.retry_condition_fn(None, None, State(ConnectionError("x")))
    assert not retrain.train_model.retry_condition_fn(None, None, State(ValueError("x")))


@pytest.mark.parametrize("pool", ["cpu-kubernetes.json", "gpu-kubernetes.json"])
def test_kubernetes_pools_recreate_a_preempted_pod_as_often_as_the_task_retries(pool: str) -> None:
    """A pod lost to pre-emption is re-created (backoffLimit) and resumes from the checkpoint;
    SIGTERM hands the run to that re-creation instead of marking it Crashed."""
    from prefect.utilities.templating import apply_values

    from tasks import retrain

    template = json.loads((Path(__file__).parents[2] / "infra" / "work-pools" / pool).read_text())
    props = template["variables"]["properties"]
    defaults = {name: spec["default"] for name, spec in props.items() if "default" in spec}
    rendered = apply_values(template["job_configuration"], defaults)
    assert rendered["job_manifest"]["spec"]["backoffLimit"] == retrain.train_model.retries == 2
    assert props["env"]["default"]["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "relinquish"
