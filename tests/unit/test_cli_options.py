"""The CLI's options come from the flows' parameter models: every field, settable, documented.

The walk below is what keeps the command line complete: a field added to TagParams,
RetrainParams (or its nested TrainParams / ThresholdParams) or DemoParams fails here unless
`multitag tag|retrain|demo` exposes it, and exposes it so that giving the option sets exactly
that field.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

import multitag
from flows.cli import build_parser, main
from flows.cli_options import ModelOptions, OptionSpec, add_model_options
from multitag.config import DemoParams, RetrainParams, TagParams

COMMANDS: list[tuple[str, type[BaseModel], list[str]]] = [
    ("tag", TagParams, ["SRC"]),  # argv before the options: the required SOURCE
    ("retrain", RetrainParams, []),
    ("demo", DemoParams, []),
]


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[tuple, Any]]:
    """Every (path, FieldInfo) of `model`, nested models' fields included: the test's own walk."""
    found = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            found += _leaves(ann, (*prefix, name))
        else:
            found.append(((*prefix, name), info))
    return found


def _options(command: str, head: list[str]) -> ModelOptions:
    args = build_parser().parse_args([command, *head])
    return args.options


def _bounds(info: Any) -> tuple[float, float]:
    lo, hi = -1e9, 1e9
    for item in info.metadata:
        if getattr(item, "ge", None) is not None:
            lo = item.ge
        if getattr(item, "gt", None) is not None:
            lo = item.gt + 1e-6
        if getattr(item, "le", None) is not None:
            hi = item.le
        if getattr(item, "lt", None) is not None:
            hi = item.lt - 1e-6
    return lo, hi


def _sample(info: Any, flag: str) -> tuple[list[str], Any]:
    """argv for `flag` that sets its field to a value other than the default, and that value."""
    default = info.get_default(call_default_factory=True)
    ann = info.annotation
    args = [a for a in getattr(ann, "__args__", ()) if a is not type(None)]
    optional = type(None) in getattr(ann, "__args__", ())
    base = args[0] if optional and len(args) == 1 else ann
    if base is bool:
        return ([f"--no-{flag[2:]}"], False) if default else ([flag], True)
    if optional and default is not None:
        return [flag, "none"], None
    if getattr(base, "__origin__", None) is Literal:
        choice = next(c for c in base.__args__ if c != default)
        return [flag, str(choice)], choice
    if getattr(base, "__origin__", None) is list:
        return [flag, "1.5", "2"], [base.__args__[0](1.5), base.__args__[0](2)]
    if base in (int, float):
        lo, hi = _bounds(info)
        start = default if isinstance(default, int | float) else 1
        tries = [start + 1, start / 2, lo, lo + 1, 0.5, 1]
        value = next(base(v) for v in tries if lo <= base(v) <= hi and base(v) != default)
        return [flag, str(value)], value
    if base is str:
        return [flag, "sample-value"], "sample-value"
    return [flag, json.dumps(default)], default  # parsed as JSON


@pytest.mark.parametrize(("command", "model", "head"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_field_is_an_option_that_sets_that_field(
    command: str, model: type[BaseModel], head: list[str]
) -> None:
    options = _options(command, head)
    leaves = _leaves(model)
    assert sorted(o.path for o in options.fields) == sorted(p for p, _ in leaves)
    for path, info in leaves:
        opt = options.option_for(".".join(path))
        if info.is_required():
            assert not opt.flags and options.values(
                build_parser().parse_args([command, *head])
            ) == {path[-1]: head[0]}
            continue
        argv, expected = _sample(info, opt.flags[0])
        given = options.values(build_parser().parse_args([command, *head, *argv]))
        node: Any = given
        for key in path:
            node = node[key]
        assert node == expected, (path, argv)
        required = {p[-1]: head[0] for p, i in leaves if i.is_required()}
        assert _count(given) == 1 + len(required), (path, given)  # that field, nothing else


def _count(tree: dict) -> int:
    return sum(_count(v) if isinstance(v, dict) else 1 for v in tree.values())


@pytest.mark.parametrize(("command", "model", "head"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_shows_each_description_and_default(
    command: str,
    model: type[BaseModel],
    head: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    options = _options(command, head)
    for path, info in _leaves(model):
        if info.description:
            assert " ".join(info.description.split())[:40] in text, path
        if not info.is_required():
            assert options.option_for(".".join(path)).flags[0] in text
    assert "(default: 1000)" in text or command == "retrain"
    assert "(default: 0.003)" in text or command != "retrain"  # the nested train.lr


def test_options_not_given_leave_the_models_defaults() -> None:
    args = build_parser().parse_args(["retrain"])
    assert args.options.values(args) == {}
    assert args.options.build(args) == RetrainParams()
    args = build_parser().parse_args(["tag", "src"])
    assert args.options.build(args) == TagParams(source="src")
    args = build_parser().parse_args(["demo"])
    assert args.options.build(args) == DemoParams()


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        (["tag", "s", "--name", "cats"], "dataset_name", "cats"),
        (["tag", "s", "--concurrency", "3"], "max_concurrency", 3),
        (["tag", "s", "--thresholds", "t.json"], "thresholds_file", "t.json"),
        (["tag", "s", "--model", "v1"], "model", "v1"),
        (["tag", "s", "--max-pixels", "none"], "max_pixels", None),
        (["tag", "s", "--shard-retry-delays-s"], "shard_retry_delays_s", []),
        (["retrain", "--lr-find"], "train.lr", None),
        (["retrain", "--lr", "none"], "train.lr", None),
        (["retrain", "--no-pretrained"], "train.pretrained", False),
        (["retrain", "--epochs", "2"], "train.epochs", 2),
        (["retrain", "--seed", "7"], "train.seed", 7),
        (["retrain", "--threshold-seed", "7"], "thresholds.seed", 7),
        (["retrain", "--threshold-policy", "global"], "thresholds.policy", "global"),
        (["retrain", "--force-promote"], "force_promote", True),
        (["demo", "--images", "100"], "n_images", 100),
        (["demo", "--epochs", "2"], "epochs", 2),
    ],
)
def test_the_option_names_of_earlier_releases_still_work(
    argv: list[str], field: str, expected: object
) -> None:
    args = build_parser().parse_args(argv)
    params: Any = args.options.build(args)
    for key in field.split("."):
        params = getattr(params, key)
    assert params == expected


class _Inner(BaseModel):
    seed: int = Field(1, description="The inner seed.")
    mode: Literal["a", "b"] | None = "a"


class _Outer(BaseModel):
    seed: int = 0
    inner: _Inner = Field(default_factory=_Inner)
    weights: dict[str, float] = Field(default_factory=dict, description="Per-label weights.")
    where: Path | None = None


def test_a_new_model_maps_without_collisions() -> None:
    """Whatever field another change adds: a nested name already taken gets its path."""
    import argparse

    parser = argparse.ArgumentParser()
    options = add_model_options(parser, _Outer, OptionSpec(prefixes={"inner": ""}))
    flags = {o.dest: o.flags[0] for o in options.fields}
    assert flags == {
        "seed": "--seed",
        "inner.seed": "--inner-seed",
        "inner.mode": "--mode",
        "weights": "--weights",
        "where": "--where",
    }
    argv = ["--inner-seed", "5", "--mode", "none", "--weights", '{"cat": 2}', "--where", "x"]
    built = options.build(parser.parse_args(argv))
    assert built == _Outer(inner=_Inner(seed=5, mode=None), weights={"cat": 2.0}, where=Path("x"))


@pytest.mark.parametrize(
    "argv",
    [
        ["tag", "src", "--batch-size", "many"],
        ["retrain", "--threshold-policy", "best"],
        ["demo", "--no-such-option"],
        ["validate"],
        ["models", "show"],
    ],
)
def test_bad_options_exit_2_with_a_json_error_under_json(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "error:" in err
    assert main([*argv, "--json"]) == 2
    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert answer["exit_code"] == 2 and answer["error"] and "usage:" in err


def test_bad_values_the_model_refuses_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tag", "src", "--batch-size", "0", "--json"]) == 2
    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert answer["exit_code"] == 2 and "batch_size" in answer["error"] and "batch_size" in err


def test_version_names_the_package_and_its_runtime(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"multitag {multitag.__version__} (python ")
    assert "torch " in out and "prefect " in out


def test_commands_that_need_no_model_do_not_import_pydantic() -> None:
    """Options are generated when their command runs: `validate` and `--help` stay light."""
    code = (
        "import sys, flows.cli as c; c.build_parser().parse_args(['validate', 'x']); "
        "c.build_parser().format_help(); print('pydantic' in sys.modules)"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert done.stdout.strip() == "False"


def test_retrain_json_carries_the_flows_result_and_people_get_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI's side of --json: the flow's result (here a stand-in run) becomes the object."""
    import flows.cli as cli

    seen: list[RetrainParams] = []

    def run_flow(command: str, fn: object, params: RetrainParams, server: object = None) -> dict:
        seen.append(params)
        print("a log line a flow printed")
        decision = {"promoted": True, "reason": "beats the champion"}
        return {"version": "v9", "decision": decision, "home": "/h", "dataset_dir": "/d"}

    monkeypatch.setattr(cli, "_prepare_runtime", lambda: None)
    monkeypatch.setattr(cli, "_start_server_early", lambda: None)
    monkeypatch.setattr(cli, "_run_flow", run_flow)
    assert main(["retrain", "--epochs", "1", "--threshold-policy", "global", "--json"]) == 0
    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert (answer["version"], answer["promoted"], answer["exit_code"]) == ("v9", True, 0)
    assert "a log line a flow printed" in err and "model v9 registered" in err
    assert (seen[0].train.epochs, seen[0].thresholds.policy) == (1, "global")
