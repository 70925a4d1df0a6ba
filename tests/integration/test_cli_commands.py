"""`multitag retrain` and `multitag models ...` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from multitag import registry
from multitag.data.shapes import make_shapes_dataset
from tests.tagging_helpers import register_tiny_model

pytestmark = pytest.mark.slow


def test_models_list_show_promote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    tiny = register_tiny_model(home, tmp_path / "work")
    other = tiny.register_copy("v-other")

    assert main(["models", "list", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    champion_line = next(line for line in out.splitlines() if tiny.version in line)
    assert champion_line.startswith("*") and other in out

    assert main(["models", "show", other, "--home", str(home)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == other and "metrics" in shown

    assert main(["models", "promote", other, "--home", str(home)]) == 0
    assert registry.get_champion(str(home))["version"] == other
    assert main(["models", "show", "no-such-version", "--home", str(home)]) == 2
    assert "no-such-version" in capsys.readouterr().err


@pytest.mark.usefixtures("prefect_harness")
def test_retrain_cli_exits_nonzero_on_a_broken_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_shapes_dataset(tmp_path / "ds", n_train=40, n_test=4, img_size=32, seed=2)
    (src / "train" / "000003.jpg").write_bytes(b"not a jpeg")
    rc = main(
        [
            "retrain",
            "--data",
            str(src),
            "--arch",
            "shapes_cnn",
            "--no-pretrained",
            "--epochs",
            "1",
            "--img-size",
            "32",
            "--home",
            str(tmp_path / "home"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "breaks its data contract" in err and "contract_report.csv" in err


def test_retrain_cli_rejects_bad_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["retrain", "--epochs", "0"]) == 2
    assert "epochs" in capsys.readouterr().err


def test_retrain_cli_passes_the_fast_path_check_size() -> None:
    from flows.cli import _retrain_params, build_parser

    args = build_parser().parse_args(["retrain", "--fastpath-check-images", "0"])
    assert _retrain_params(args).fastpath_check_images == 0
    default = build_parser().parse_args(["retrain"])
    assert _retrain_params(default).fastpath_check_images == 1000


def test_retrain_cli_rejects_a_negative_fast_path_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["retrain", "--fastpath-check-images", "-1"]) == 2
    assert "fastpath_check_images" in capsys.readouterr().err


@pytest.mark.usefixtures("prefect_harness")
def test_cli_flows_send_heartbeats_without_waiting_for_their_thread_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from prefect import flow, flow_engine
    from prefect.settings import temporary_settings

    from flows.ephemeral import heartbeat_not_awaited

    joins: list[bool] = []
    send = flow_engine._send_heartbeats

    def record_join(engine: object, join_on_exit: bool = True) -> object:
        joins.append(join_on_exit)
        return send(engine, join_on_exit=join_on_exit)

    monkeypatch.setattr(flow_engine, "_send_heartbeats", record_join)
    emitted = threading.Event()
    emit = flow_engine.FlowRunEngine._emit_flow_run_heartbeat

    def record_emit(self: object, *args: object) -> None:
        emit(self, *args)
        emitted.set()

    monkeypatch.setattr(flow_engine.FlowRunEngine, "_emit_flow_run_heartbeat", record_emit)

    @flow
    def beats() -> bool:
        return emitted.wait(timeout=30)  # the heartbeat thread emits as it starts

    with temporary_settings(updates={"flows.heartbeat_frequency": 30}):
        with heartbeat_not_awaited() as changed:
            assert beats() is True
        emitted.clear()
        assert beats() is True
    assert changed and joins == [False, True]
    assert flow_engine._send_heartbeats is record_join


def test_heartbeat_tweak_leaves_an_engine_without_the_hook_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect import flow_engine

    from flows.ephemeral import heartbeat_not_awaited

    monkeypatch.setattr(flow_engine, "_send_heartbeats", lambda engine: None)
    with heartbeat_not_awaited() as changed:
        assert not changed
    monkeypatch.delattr(flow_engine, "_send_heartbeats")
    with heartbeat_not_awaited() as changed:
        assert not changed
