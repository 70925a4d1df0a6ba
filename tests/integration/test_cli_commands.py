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

    assert main(["models", "show", other, "--home", str(home), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == other and "metrics" in shown

    assert main(["models", "promote", other, "--home", str(home)]) == 0
    assert registry.get_champion(str(home))["version"] == other
    assert main(["models", "show", "no-such-version", "--home", str(home)]) == 2
    assert "no-such-version" in capsys.readouterr().err


def test_models_json_is_one_object_on_stdout_and_people_read_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    tiny = register_tiny_model(home, tmp_path / "work")
    other = tiny.register_copy("v-other")

    assert main(["models", "list", "--home", str(home), "--json"]) == 0
    out, err = capsys.readouterr()
    listed = json.loads(out)
    assert listed["exit_code"] == 0 and tiny.version in err  # the table, for people
    assert {r["version"] for r in listed["versions"]} == {tiny.version, other}
    assert [r["version"] for r in listed["versions"] if r.get("is_champion")] == [tiny.version]

    assert main(["models", "show", tiny.version, "--home", str(home), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    for key in ("name", "lineage", "baselines", "calibration", "thresholds", "files"):
        assert key in shown, key

    assert main(["models", "promote", other, "--home", str(home), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["champion"] == other and other in err

    assert main(["models", "show", "no-such-version", "--home", str(home), "--json"]) == 2
    out, err = capsys.readouterr()
    failed = json.loads(out)
    assert failed["exit_code"] == 2 and "no-such-version" in failed["error"]
    assert "no-such-version" in err


def test_models_show_for_people_names_lineage_baselines_and_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import format_version

    home = tmp_path / "home"
    tiny = register_tiny_model(home, tmp_path / "work")
    assert main(["models", "show", tiny.version, "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"version: {tiny.version}  (champion)")
    assert "mAP:" in out and "per_label:" in out
    assert "baselines: none recorded" in out  # the tiny model predates them

    text = format_version(
        {
            "version": "v1",
            "name": "cats",
            "metrics": {"validation": {"n_images": 30, "mAP": 0.91, "per_label": {}}},
            "baselines": {"mAP": 0.845},
            "lineage": {"dataset_sha256": "ab" * 32, "rows": {"train": 20, "valid": 10}},
            "calibration": {"method": "temperature", "ece_after": {"validation": 0.02}},
        }
    )
    for line in ("name: cats", "  mAP: 0.9100", "baselines:", "  mAP: 0.8450", "lineage:",
                 f"  dataset_sha256: {'ab' * 32}", "    train: 20", "calibration:",
                 "  method: temperature", "    validation: 0.0200"):  # fmt: skip
        assert line in text.splitlines(), line


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
            "--json",
        ]
    )
    assert rc == 1
    out, err = capsys.readouterr()
    assert "breaks its data contract" in err and "contract_report.csv" in err
    answer = json.loads(out)  # with --json: one object on stdout, the logs on stderr
    assert answer["exit_code"] == 1 and "breaks its data contract" in answer["error"]


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
def test_cli_flows_keep_their_heartbeats_against_a_server_that_outlives_the_run() -> None:
    """Heartbeats (Prefect's crash detection) stay on unless the server ends with the run:
    only the public `flows.heartbeat_frequency` setting is changed, never the engine."""
    from prefect import flow_engine
    from prefect.settings import get_current_settings, temporary_settings

    from flows.cli import _run_flow

    send = flow_engine._send_heartbeats
    seen: list[object] = []

    class Done:
        def is_completed(self) -> bool:
            return True

        def result(self) -> str:
            return "ok"

    def flow_fn(params: object, return_state: bool) -> Done:
        seen.append(get_current_settings().flows.heartbeat_frequency)
        return Done()

    url = get_current_settings().api.url
    assert url  # the harness's server, as a configured one would be
    with temporary_settings(updates={"flows.heartbeat_frequency": 60, "api.url": url}):
        assert _run_flow("tag", flow_fn, None) == "ok"
    assert seen == [60] and flow_engine._send_heartbeats is send


def _raising(error: BaseException):
    def command(args: object) -> int:
        raise error

    return command


@pytest.mark.parametrize("argv", [["tag", "x"], ["retrain"], ["validate", "x"],
                                  ["models", "list"], ["demo"]])  # fmt: skip
def test_every_subcommand_maps_errors_to_the_same_exit_codes(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """0 done, 1 the run failed, 2 the input could not be used: decided in one place."""
    from flows import cli
    from multitag.data.datasets import DatasetError
    from multitag.errors import InputError, RunFailedError

    cases = [
        (InputError("no such folder: x"), 2),
        (RunFailedError("shard 3 kept failing"), 1),
        (DatasetError("no such archive or folder"), 2),
        (DatasetError("download cut off", retryable=True), 1),
        (registry.VersionNotFoundError("no model version v9"), 2),
        (registry.IntegrityError("sha256 mismatch"), 1),
    ]
    for error, code in cases:
        parser = cli.build_parser()
        args = parser.parse_args(argv)
        monkeypatch.setattr(cli, "build_parser", lambda a=args: _Parsed(a))
        args.func = _raising(error)
        assert cli.main(argv) == code, (argv, error)
        err = capsys.readouterr().err
        assert err.startswith(f"multitag {argv[0]}") and str(error) in err
        assert "Traceback" not in err


class _Parsed:
    def __init__(self, args: object) -> None:
        self.args = args

    def parse_args(self, argv: object) -> object:
        return self.args


def test_models_exit_2_for_a_version_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    register_tiny_model(home, tmp_path / "work")
    assert main(["models", "promote", "no-such-version", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("multitag models promote:") and "no-such-version" in err


@pytest.mark.usefixtures("prefect_harness")
def test_tag_exits_2_when_the_source_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI's docstring promise: input that cannot be used is 2, not a failed run's 1."""
    home = tmp_path / "home"
    register_tiny_model(home, tmp_path / "work")
    missing = tmp_path / "no-such-folder"
    out = tmp_path / "out"
    assert main(["tag", str(missing), "--out", str(out), "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("multitag tag: the flow ended Failed: SourceNotFoundError")
    assert str(missing) in err and "Traceback" not in err
