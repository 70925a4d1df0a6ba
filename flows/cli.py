"""The `multitag` command line: one small function per subcommand.

Why argparse and lazy imports: `multitag --help` and `multitag validate` must answer in well
under a second on a loaded machine, so this module imports at load time only the standard
library and the project modules that import nothing else (`multitag.errors`,
`flows.ephemeral`); each `_cmd_<name>` imports what pulls in pandas, torch, pydantic or
prefect when it runs (tests/unit/test_cli_validate.py::test_cli_import_stays_light).

Exit codes: 0 success, 1 the command ran and found a problem (e.g. a broken data contract),
2 the input could not be used (bad arguments, no such folder, unreadable file). `main` is
the one place that maps errors to them: every project error is a `MultitagError` that
carries its exit code (multitag/errors.py).

For scripts: the options of `tag`, `retrain` and `demo` are generated from the flows'
parameter models (flows/cli_options.py), so every parameter is reachable with its help text
and default; `--json` makes a command print exactly one JSON object on stdout (its result, or
{"error", "exit_code"}) and everything meant for people on stderr.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import gc
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.cli_options import (
    LazyParser,
    ModelOptions,
    OptionSpec,
    Switch,
    UsageError,
    add_model_options,
)
from flows.ephemeral import (
    EarlyServer,
    check_configured_api,
    no_heartbeats_on_temporary_server,
    start_early,
)
from multitag.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNUSABLE,
    CommandError,
    InputError,
    MultitagError,
    exit_code_of,
)
from multitag.runtime import configure_cpu_runtime

if TYPE_CHECKING:  # pydantic (multitag.config) is imported only by the commands that use it
    from multitag.config import RetrainParams, TagParams


# A command returns its exit code, or its exit code and its result (what --json prints).
Outcome = int | tuple[int, dict[str, Any]]

EXIT_CODES_HELP = """exit codes (the same for every command):
  0  success
  1  the run failed: a broken data contract, shards that kept failing, a flow that
     failed, a tampered model file; fixing the cause or retrying may help
  2  the input could not be used: bad options, no such folder, file or model version

--json (every command): exactly one JSON object on stdout, the result or
{"error": ..., "exit_code": ...}; everything meant for people goes to stderr."""

# Option names kept from before the options were generated from the models.
RETRAIN_OPTIONS = OptionSpec(
    prefixes={"train": "", "thresholds": "threshold-"},
    switches=(
        Switch("--lr-find", "train.lr", None, "pick the learning rate with lr_find (--lr none)"),
    ),
)
TAG_OPTIONS = OptionSpec(
    aliases={
        "dataset_name": ("--name",),
        "max_concurrency": ("--concurrency",),
        "thresholds_file": ("--thresholds",),
    },
    exclusive=(("min_precision", "thresholds_file"),),
)
DEMO_OPTIONS = OptionSpec(aliases={"n_images": ("--images",)})


class _VersionAction(argparse.Action):
    """`--version`: looked up only when asked for (importlib.metadata, no heavy imports)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_text())
        parser.exit(EXIT_OK)


def version_text() -> str:
    """`multitag X (python P, torch T, fastai F, prefect R)`: the package and what it runs on."""
    from importlib.metadata import PackageNotFoundError, version

    import multitag

    found = [f"python {sys.version.split()[0]}"]
    for dist in ("torch", "fastai", "prefect"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} not installed")
    return f"multitag {multitag.__version__} ({', '.join(found)})"


def build_parser() -> argparse.ArgumentParser:
    parser = LazyParser(
        prog="multitag",
        description="Train multi-label image classifiers and bulk-tag image folders and buckets.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_validate(sub)
    _add_retrain(sub)
    _add_tag(sub)
    _add_models(sub)
    _add_demo(sub)
    return parser


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check a dataset folder (train.csv + train/) against its data contract",
        description="Check DATASET_DIR/train.csv and the images under DATASET_DIR/train "
        "against data_contracts/training_labels.yaml. Exit 0: the contract holds; "
        "1: it does not (violations listed); 2: the folder or train.csv cannot be used.",
    )
    p.add_argument("dataset_dir", metavar="DATASET_DIR", type=Path)
    p.add_argument(
        "--report-csv",
        metavar="PATH",
        type=Path,
        help="write every violation (errors and warnings, no cap) to this CSV file",
    )
    p.add_argument(
        "--max-print",
        metavar="N",
        type=int,
        default=50,
        help="print at most N errors and N warnings (default 50)",
    )
    p.add_argument(
        "--skip-images",
        action="store_true",
        help="check paths only; do not open the images (faster, misses corrupt files)",
    )
    _add_json(p)
    p.set_defaults(func=_cmd_validate)


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="print exactly one JSON object on stdout (the result, or {error, exit_code}); "
        "everything meant for people goes to stderr",
    )


def _cmd_validate(args: argparse.Namespace) -> Outcome:
    from multitag.data.contracts import ContractError, DatasetUnusableError, validate_dataset

    try:
        report = validate_dataset(args.dataset_dir, check_images=not args.skip_images)
    except DatasetUnusableError as e:
        raise CommandError(f"cannot use this dataset: {e}", e) from e
    except ContractError as e:
        raise CommandError(f"the data contract itself is broken: {e}", e) from e
    if args.report_csv is not None:
        report.to_csv(args.report_csv)
        more = f"All of them are in {args.report_csv}."
    else:
        more = "Rerun with --report-csv PATH to get all of them."
    limit = max(args.max_print, 0)
    print(report.format_text(limit=limit, more=more))
    if args.report_csv is not None:
        print(f"Report CSV: {args.report_csv}")
    result = {
        **report.summary(),
        "errors": [dataclasses.asdict(v) for v in report.errors[:limit]],  # all: --report-csv
        "warnings": [dataclasses.asdict(v) for v in report.warnings[:limit]],
        "report_csv": None if args.report_csv is None else str(args.report_csv),
    }
    if report.ok:
        return EXIT_OK, result
    problem = (
        f"{args.dataset_dir} breaks the data contract ({len(report.errors)} errors); "
        "fix the rows listed above and run it again."
    )
    print(f"multitag validate: {problem}", file=sys.stderr)
    return EXIT_FAILED, {**result, "error": problem}


def _add_retrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain",
        help="run the retrain flow: acquire, validate, train, thresholds, register, gate",
        description="Train a candidate model on a dataset (archive URL, local archive, or folder "
        "in the PASCAL_2007 layout) through the Prefect retrain flow; it becomes champion only "
        "if it beats the current one. Exit 1 if the flow fails (e.g. a broken data contract).",
        populate=_retrain_options,
    )
    p.set_defaults(func=_cmd_retrain)


def _retrain_options(p: LazyParser) -> None:
    from multitag.config import RetrainParams

    p.set_defaults(options=add_model_options(p, RetrainParams, RETRAIN_OPTIONS))
    _add_json(p)


def _params(args: argparse.Namespace) -> Any:
    """The command's parameter model from its options (raises pydantic's ValidationError)."""
    options: ModelOptions = args.options
    return options.build(args)


def _retrain_params(args: argparse.Namespace) -> RetrainParams:
    return _params(args)


def _cmd_retrain(args: argparse.Namespace) -> Outcome:
    params = _validated(_retrain_params, args)
    _prepare_runtime()
    server = _start_server_early()
    from flows.retrain import retrain

    result = _run_flow("retrain", retrain, params, server)
    d = result["decision"]
    if result.get("reused"):  # "no new data": nothing was trained or registered
        print(f"no new data: {d.get('reason')}; model {result['version']} reused")
        return EXIT_OK, {**result, "promoted": False}
    print(f"model {result['version']} registered under {result['home']}/models")
    print(f"promotion: {'PROMOTED' if d.get('promoted') else 'kept champion'} ({d.get('reason')})")
    return EXIT_OK, {**result, "promoted": bool(d.get("promoted"))}


def _validated(make: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> Any:
    """`make(args)`, a pydantic ValidationError turned into an InputError (exit 2)."""
    from pydantic import ValidationError

    try:
        return make(args)
    except ValidationError as e:
        raise InputError(f"bad parameters:\n{e}") from e


def _add_tag(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tag",
        help="run the tag flow: tag every image under SOURCE into Parquet, exactly once",
        description="Tag the images under SOURCE (folder or s3:// prefix) with the champion "
        "model (or --model VERSION) and write Parquet shards + a manifest under OUT. Rerunning "
        "tags only images not yet in finished shards.",
        populate=_tag_options,
    )
    p.set_defaults(func=_cmd_tag)


def _tag_options(p: LazyParser) -> None:
    from multitag.config import TagParams

    p.set_defaults(options=add_model_options(p, TagParams, TAG_OPTIONS))
    _add_json(p)


def _cmd_tag(args: argparse.Namespace) -> Outcome:
    params: TagParams = _validated(_params, args)
    _stop_on_sigterm()
    try:
        _prepare_runtime()
        server = _start_server_early()
        if not params.on_dask:
            # The model loads here, while the temporary server boots on the other core; then
            # a head start tags the first images while Prefect is imported and the flow
            # starts (server boot, or with a configured server the flow engine's own start
            # and its first API calls).
            _prefetch(params)
        from flows.tag import tag_images_with

        s = _run_flow("tag", tag_images_with, params, server)
    except KeyboardInterrupt:
        return _stopped("tag")
    rate = f"{s['images_per_s']:.1f} images/s" if s["images_per_s"] else "nothing new to tag"
    print(
        f"tagged {s['tagged']}, failed {s['failed']}, skipped {s['skipped']} ({rate}) "
        f"with model {s['model_version']}\noutput: {s['output']}\nmanifest: {s['manifest']}"
    )
    if s["drift_flagged"]:
        print(f"DRIFT: label rates moved for {', '.join(s['drift_flagged'])} (see the manifest)")
    return EXIT_OK, dict(s)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, show and promote registered model versions")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ls = msub.add_parser(
        "list", help="every version with its model name and metrics; * marks each name's champion"
    )
    ls.add_argument("--name", help="only the versions of this model name")
    ls.set_defaults(func=_cmd_models_list)
    show = msub.add_parser("show", help="metrics, thresholds and files of one version")
    show.add_argument(
        "version", metavar="REF", help="VERSION, NAME@VERSION, or NAME (its champion)"
    )
    show.set_defaults(func=_cmd_models_show)
    promote = msub.add_parser(
        "promote", help="make VERSION its model name's champion (recorded, forced)"
    )
    promote.add_argument(
        "version", metavar="REF", help="NAME@VERSION (checked to belong to NAME) or VERSION"
    )
    promote.set_defaults(func=_cmd_models_promote)
    for q in (ls, show, promote):
        q.add_argument("--home", help="storage root (default MULTITAG_HOME)")
        _add_json(q)


def _cmd_models_list(args: argparse.Namespace) -> Outcome:
    from multitag import registry

    rows = registry.list_versions(args.home)
    if args.name is not None:
        registry.check_model_name(args.name)
        rows = [r for r in rows if r.get("name") == args.name]
    if not rows:
        which = f" named {args.name!r}" if args.name is not None else ""
        print(f"no model versions{which} yet: run `multitag retrain` (or `make demo`) first")
        return EXIT_OK, {"versions": []}
    width = max(len(str(r.get("name") or "")) for r in rows)
    for r in rows:
        mark = "*" if r.get("is_champion") else " "  # the champion of its own name
        state = "" if r.get("complete", True) else "  INCOMPLETE"
        metrics = "  ".join(
            f"{k}={v:.4f}" for k, v in (r.get("metrics") or {}).items() if isinstance(v, float)
        )
        name = str(r.get("name") or "-").ljust(width)
        print(f"{mark} {name}  {r['version']}  {r.get('created') or '-'}  {metrics}{state}")
    return EXIT_OK, {"versions": rows}


def _cmd_models_show(args: argparse.Namespace) -> Outcome:
    from multitag import registry

    info = registry.show_version(args.home, registry.resolve_model_ref(args.home, args.version))
    info.setdefault("calibration", (info.get("metrics") or {}).get("calibration"))
    print(format_version(info))
    return EXIT_OK, info


def _cmd_models_promote(args: argparse.Namespace) -> Outcome:
    from multitag import registry

    ref = str(args.version)
    # NAME@VERSION is checked to belong to NAME; a bare NAME would promote its own champion.
    version = registry.resolve_model_ref(args.home, ref) if "@" in ref else ref
    decision = registry.promote(args.home, version)
    print(f"champion of {decision.name!r}: {version} ({decision.reason})")
    announced = announce_promotion(args.home, version, decision.to_dict())
    return EXIT_OK, {
        "version": version,
        "name": decision.name,
        "champion": version,
        "reason": decision.reason,
        "event_sent": announced,
    }


def announce_promotion(home: str | None, version: str, decision: dict[str, Any]) -> bool:
    """Send `multitag.model.promoted` for a promotion made by hand, when a Prefect API is
    configured: the re-tag trigger in infra/prefect.yaml then reacts to it as to a retrain's.

    Why only then: without PREFECT_API_URL there is no server whose triggers could react, and
    emitting would start a temporary one just to drop the event. Returns whether it was sent.
    """
    from prefect.settings import PREFECT_API_URL  # only here: `models` stays light otherwise

    if not PREFECT_API_URL.value():
        return False
    from multitag import registry
    from tasks.events import emit_model_promoted

    metrics = registry.show_version(home, version).get("metrics") or {}
    name = str(decision.get("name") or "")
    dataset = str((metrics.get("dataset") or {}).get("name") or name)
    uri = registry.version_uri(home, version)
    return emit_model_promoted(version, dataset, decision, model_name=name, uri=uri) is not None


def format_version(info: dict[str, Any]) -> str:
    """`models show` for a person: which version, how good, from what data, calibrated how.

    Everything else (per-label details, files' hashes, the report) is in `--json`.
    """
    champion = "  (champion)" if info.get("is_champion") else ""
    lines = [f"version: {info.get('version')}{champion}"]
    lines += [f"{k}: {info.get(k) or '-'}" for k in ("name", "created", "uri", "model_sha256")]
    if not info.get("complete", True) or info.get("problem"):
        lines.append(f"INCOMPLETE: {info.get('problem') or 'no SHA256SUMS'}")
    metrics = info.get("metrics") or {}
    splits = {k: v for k, v in metrics.items() if isinstance(v, dict) and "n_images" in v}
    thresholds = info.get("thresholds") or {}
    sections = {
        **{f"metrics ({split})": _scalars(v) for split, v in splits.items()},
        "baselines": info.get("baselines"),
        "calibration": info.get("calibration"),
        "lineage": info.get("lineage"),
        "thresholds": {
            **_scalars({k: thresholds.get(k) for k in ("objective", "policy", "global_threshold")}),
            "per_label": thresholds.get("per_label"),
        },
    }
    for title, value in sections.items():
        if not value:
            lines.append(f"{title}: none recorded")
            continue
        lines.append(f"{title}:")
        lines.extend(_indented(value, "  "))
    files = info.get("files") or []
    lines.append(f"files: {', '.join(f['name'] for f in files) or '-'}")
    lines.append(f"decisions: {len(info.get('decisions') or [])} recorded")
    return "\n".join(lines)


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None and not isinstance(v, dict | list)}


def _indented(value: Any, pad: str) -> list[str]:
    """Nested dicts as `key: value` lines (a third level inline), floats to 4 places."""
    if not isinstance(value, dict):
        return [f"{pad}{_scalar(value)}"]
    lines: list[str] = []
    for k, v in value.items():
        if isinstance(v, dict) and v and len(pad) < 4:
            lines.append(f"{pad}{k}:")
            lines.extend(_indented(v, pad + "  "))
        else:
            lines.append(f"{pad}{k}: {_scalar(v)}")
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return "  ".join(f"{k}={_scalar(v)}" for k, v in value.items())
    if isinstance(value, list):
        shown = ", ".join(_scalar(v) for v in value[:8])
        return f"[{shown}{', ...' if len(value) > 8 else ''}]"
    return str(value)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="offline end to end: shapes dataset -> retrain -> tag, on Prefect's local server",
        populate=_demo_options,
    )
    p.set_defaults(func=_cmd_demo)


def _demo_options(p: LazyParser) -> None:
    from multitag.config import DemoParams

    p.set_defaults(options=add_model_options(p, DemoParams, DEMO_OPTIONS))
    _add_json(p)


def _cmd_demo(args: argparse.Namespace) -> Outcome:
    params = _validated(_params, args)
    _prepare_runtime()
    server = _start_server_early()
    from flows.demo import demo, print_demo_summary

    result = _run_flow("demo", demo, params, server)
    print_demo_summary(result)
    return EXIT_OK, result


_EXIT_GRACE_S = 5.0  # after a stop, for threads to end and Prefect's logs to drain
_terminated: list[int] = []  # the signal that stopped this process, if one did


def _stop_on_sigterm() -> None:
    """Make SIGTERM (a scheduler's cancel, `kill PID`) a prompt stop that keeps finished work.

    The handler raises KeyboardInterrupt in the main thread, whatever it is doing (loading
    the model, waiting for the server, or, after a running flow has stopped its shards and
    recorded itself Crashed, see `flows.tag._shards_stop_on_sigterm`); the command then
    ends through `_stopped`. A second SIGTERM ends the process at once.
    """

    def handler(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)
        _terminated.append(signum)
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _stopped(command: str) -> int:
    """Report a stop by SIGTERM or Ctrl-C; the process then ends within _EXIT_GRACE_S.

    Why the timer: Python joins every non-daemon thread at exit, and one stuck on a read (a
    decode worker on a hung network read) would keep a stopped process alive. Finished
    shards are already whole on disk; a temp file of one in progress is removed by the next
    run, so ending without the rest of the clean-up loses nothing.
    """
    code = 128 + (_terminated[0] if _terminated else 2)  # 143 for SIGTERM, 130 for Ctrl-C
    print(
        f"multitag {command}: stopped; finished shards are kept, rerun to tag the rest",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    timer = threading.Timer(_EXIT_GRACE_S, os._exit, args=(code,))
    timer.daemon = True
    timer.start()
    return code


def _prepare_runtime() -> None:
    """Environment for torch and an offline Prefect, set before either is imported."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The library's `multitag.*` lines in each run's logs (UI); read when prefect is imported.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "multitag")
    configure_cpu_runtime()


def _prefetch(params: TagParams) -> None:
    """Load the tagger `tag_images(params)` will use and start its head start, before Prefect
    is imported (~1.4 s of one core, during which the head start tags on the other).

    The home is resolved as `tag_images` resolves it, so its shard tasks find the cached
    tagger and the rows its head start tagged meanwhile (`multitag.tagging.headstart`).
    """
    from multitag import tagging

    tagging.prefetch_tagger(params.with_home_resolved(), head_start=True)


def _start_server_early() -> EarlyServer | None:
    """Spawn Prefect's temporary server before the flow imports (see flows/ephemeral.py)."""
    return start_early()


def _run_flow(
    command: str, flow_fn: Callable[..., Any], params: Any, server: EarlyServer | None = None
) -> Any:
    """Run a flow to its final state and return its result.

    A failure raises `CommandError` with the flow's error and its exit code (a missing
    source: 2), which `main` reports in one line instead of a traceback. `server`: the
    temporary Prefect server from `_start_server_early` (spawned before the flow's imports), adopted
    here (made this process's PREFECT_API_URL) before the flow, so the flow uses it instead
    of starting a second one.
    """
    from prefect.settings import get_current_settings  # prefect: ~0.8 s, only when a flow runs

    # Exit cost: the interpreter's final garbage collections walk every object that Prefect,
    # the server client and the model left (~1 s here); frozen objects are skipped. Buffered
    # files are still closed by reference counting and atexit handlers still run.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    ours = server.adopt() if server is not None else False
    if not ours:
        check_configured_api(get_current_settings().api.url)
    with no_heartbeats_on_temporary_server(ours):
        state = flow_fn(params, return_state=True)
    if state.is_completed():
        return state.result()
    try:
        state.result()
    except Exception as e:
        raise CommandError(f"the flow ended {state.name}: {type(e).__name__}: {e}", e) from e
    raise CommandError(
        f"the flow ended {state.name}: {state.message or 'no error message'}",
        RuntimeError(state.message),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv  # known before parsing, so a usage error answers in JSON too
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:  # bad options (argparse's own exit code, 2)
        print(f"{e.usage.rstrip()}\n{e.prog}: error: {e.message}", file=sys.stderr)
        return _answer(as_json, EXIT_UNUSABLE, {"error": f"{e.prog}: {e.message}"})
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else EXIT_UNUSABLE
    as_json = bool(getattr(args, "json", False))
    command = " ".join(filter(None, (args.command, getattr(args, "models_command", None))))
    try:
        with _people_output_on_stderr(as_json):
            outcome = args.func(args)
    except MultitagError as e:  # the one place errors become exit codes
        print(f"multitag {command}: {e}", file=sys.stderr)
        return _answer(as_json, exit_code_of(e), {"error": str(e)})
    code, result = outcome if isinstance(outcome, tuple) else (outcome, {})
    if code != EXIT_OK and "error" not in result:  # stopped by a signal (130, 143)
        result = {**result, "error": f"multitag {command}: stopped"}
    return _answer(as_json, code, result)


@contextlib.contextmanager
def _people_output_on_stderr(as_json: bool) -> Iterator[None]:
    """With --json, stdout carries only the JSON answer: what the command prints for people
    (and anything that prints while it runs, in every thread) goes to stderr."""
    if not as_json:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _answer(as_json: bool, code: int, result: dict[str, Any]) -> int:
    """Print the one JSON object of --json (result and exit code); return the exit code."""
    if as_json:
        print(json.dumps({**result, "exit_code": code}, default=str))
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
