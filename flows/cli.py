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
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multitag",
        description="Train multi-label image classifiers and bulk-tag image folders and buckets.",
    )
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
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
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
    print(report.format_text(limit=max(args.max_print, 0), more=more))
    if args.report_csv is not None:
        print(f"Report CSV: {args.report_csv}")
    if report.ok:
        return EXIT_OK
    print(
        f"multitag validate: {args.dataset_dir} breaks the data contract "
        f"({len(report.errors)} errors); fix the rows listed above and run it again.",
        file=sys.stderr,
    )
    return EXIT_FAILED


def _add_retrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain",
        help="run the retrain flow: acquire, validate, train, thresholds, register, gate",
        description="Train a candidate model on a dataset (archive URL, local archive, or folder "
        "in the PASCAL_2007 layout) through the Prefect retrain flow; it becomes champion only "
        "if it beats the current one. Exit 1 if the flow fails (e.g. a broken data contract).",
    )
    p.add_argument("--data", metavar="URL_OR_DIR", help="default: fastai URLs.PASCAL_2007")
    p.add_argument(
        "--data-sha256", metavar="HEX", help="sha256 of the archive, checked before extraction"
    )
    p.add_argument("--arch", help="resnet18/34/50..., a timm name, or shapes_cnn")
    p.add_argument("--epochs", type=int)
    p.add_argument("--img-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (omit with --lr-find)")
    p.add_argument("--lr-find", action="store_true", help="pick the learning rate with lr_find")
    p.add_argument("--no-pretrained", action="store_true", help="random init (no ImageNet weights)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threshold-policy", choices=["global", "per_label", "shrunk"])
    p.add_argument("--force-promote", action="store_true", help="make it champion regardless")
    p.add_argument(
        "--baseline-margin",
        type=float,
        metavar="M",
        help="promote only if the promote metric beats the label-prior baseline by more than M "
        "(absolute; default 0.02)",
    )
    p.add_argument(
        "--fastpath-check-images",
        type=int,
        metavar="N",
        help="validation images the CPU fast path is checked on at export (default 1000; 0: none)",
    )
    p.add_argument("--home", help="storage root (default MULTITAG_HOME)")
    p.set_defaults(func=_cmd_retrain)


def _retrain_params(args: argparse.Namespace) -> RetrainParams:
    from multitag.config import RetrainParams

    train = {
        k: v
        for k, v in {
            "arch": args.arch,
            "epochs": args.epochs,
            "img_size": args.img_size,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "device": args.device,
        }.items()
        if v is not None
    }
    if args.lr_find:
        train["lr"] = None
    if args.no_pretrained:
        train["pretrained"] = False
    data: dict = {"train": train, "force_promote": args.force_promote, "home": args.home}
    if args.baseline_margin is not None:
        data["baseline_margin"] = args.baseline_margin
    if args.data:
        data["data"] = args.data
    if args.data_sha256:
        data["data_sha256"] = args.data_sha256
    if args.threshold_policy:
        data["thresholds"] = {"policy": args.threshold_policy}
    if args.fastpath_check_images is not None:
        data["fastpath_check_images"] = args.fastpath_check_images
    return RetrainParams.model_validate(data)


def _cmd_retrain(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        params = _retrain_params(args)
    except ValidationError as e:
        raise InputError(f"bad parameters:\n{e}") from e
    _prepare_runtime()
    server = _start_server_early()
    from flows.retrain import retrain

    result = _run_flow("retrain", retrain, params, server)
    d = result["decision"]
    print(f"model {result['version']} registered under {result['home']}/models")
    print(f"promotion: {'PROMOTED' if d.get('promoted') else 'kept champion'} ({d.get('reason')})")
    return EXIT_OK


def _add_tag(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tag",
        help="run the tag flow: tag every image under SOURCE into Parquet, exactly once",
        description="Tag the images under SOURCE (folder or s3:// prefix) with the champion "
        "model (or --model VERSION) and write Parquet shards + a manifest under OUT. Rerunning "
        "tags only images not yet in finished shards.",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--out", help="output root (default MULTITAG_HOME/tags)")
    p.add_argument("--model", dest="model", metavar="VERSION")
    p.add_argument("--name", dest="dataset_name", help="dataset name under OUT")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--shard-size", type=int)
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "int8"],
        help="auto (default): the fastest scorer checked at export; fp32: exact, the scores "
        "fastai's get_preds gives",
    )
    p.add_argument("--concurrency", dest="max_concurrency", type=int)
    p.add_argument("--dask-address", help="tcp://host:8786 of a Dask scheduler")
    p.add_argument("--dask-local-workers", type=int, help="start a local Dask cluster")
    p.add_argument("--home", help="registry root (default MULTITAG_HOME)")
    p.add_argument(
        "--retry-errors",
        action="store_true",
        default=None,
        help="tag again the images whose latest row is an error (after fixing the cause); "
        "the new rows supersede them (column `attempt`)",
    )
    p.add_argument(
        "--single-writer",
        action="store_true",
        default=None,
        help="allow an output store that ignores conditional writes (If-None-Match): only "
        "one run at a time may then write this output",
    )
    point = p.add_mutually_exclusive_group()
    point.add_argument(
        "--min-precision",
        type=float,
        metavar="P",
        help="operating point: per label, the lowest threshold whose validation precision "
        "is >= P (labels that never reach P are never predicted); default: training's",
    )
    point.add_argument(
        "--thresholds",
        dest="thresholds_file",
        metavar="FILE",
        help='operating point: a JSON file {"label": threshold, ...} (or a thresholds.json) '
        "with exactly the model's labels",
    )
    p.set_defaults(func=_cmd_tag)


def _cmd_tag(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from multitag.config import TagParams

    names = (
        "source",
        "out",
        "model",
        "dataset_name",
        "batch_size",
        "shard_size",
        "precision",
        "max_concurrency",
        "dask_address",
        "dask_local_workers",
        "home",
        "retry_errors",
        "single_writer",
        "min_precision",
        "thresholds_file",
    )
    try:
        params = TagParams.model_validate(
            {n: getattr(args, n) for n in names if getattr(args, n) is not None}
        )
    except ValidationError as e:
        raise InputError(f"bad parameters:\n{e}") from e
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
        from flows.tag import tag_images

        s = _run_flow("tag", tag_images, params, server)
    except KeyboardInterrupt:
        return _stopped("tag")
    rate = f"{s['images_per_s']:.1f} images/s" if s["images_per_s"] else "nothing new to tag"
    print(
        f"tagged {s['tagged']}, failed {s['failed']}, skipped {s['skipped']} ({rate}) "
        f"with model {s['model_version']}\noutput: {s['output']}\nmanifest: {s['manifest']}"
    )
    if s["drift_flagged"]:
        print(f"DRIFT: label rates moved for {', '.join(s['drift_flagged'])} (see the manifest)")
    return EXIT_OK


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, show and promote registered model versions")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ls = msub.add_parser("list", help="every version, newest first, with its metrics")
    ls.set_defaults(func=_cmd_models_list)
    show = msub.add_parser("show", help="metrics, thresholds and files of one version")
    show.add_argument("version", metavar="VERSION")
    show.set_defaults(func=_cmd_models_show)
    promote = msub.add_parser("promote", help="make VERSION the champion (recorded, forced)")
    promote.add_argument("version", metavar="VERSION")
    promote.set_defaults(func=_cmd_models_promote)
    for q in (ls, show, promote):
        q.add_argument("--home", help="storage root (default MULTITAG_HOME)")


def _cmd_models_list(args: argparse.Namespace) -> int:
    from multitag import registry

    rows = registry.list_versions(args.home)
    if not rows:
        print("no model versions yet: run `multitag retrain` (or `make demo`) first")
        return EXIT_OK
    for r in rows:
        mark = "*" if r.get("is_champion") else " "
        state = "" if r.get("complete", True) else "  INCOMPLETE"
        metrics = "  ".join(
            f"{k}={v:.4f}" for k, v in (r.get("metrics") or {}).items() if isinstance(v, float)
        )
        print(f"{mark} {r['version']}  {r.get('created') or '-'}  {metrics}{state}")
    return EXIT_OK


def _cmd_models_show(args: argparse.Namespace) -> int:
    from multitag import registry

    info = registry.show_version(args.home, args.version)
    print(json.dumps(info, indent=2, default=str))
    return EXIT_OK


def _cmd_models_promote(args: argparse.Namespace) -> int:
    from multitag import registry

    decision = registry.promote(args.home, args.version)
    print(f"champion: {args.version} ({decision.reason})")
    return EXIT_OK


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="offline end to end: shapes dataset -> retrain -> tag, on Prefect's local server",
    )
    p.add_argument("--images", type=int, help="labelled images to generate (default 6000)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--home", help="storage root (default MULTITAG_HOME)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from multitag.config import DemoParams

    data = {"n_images": args.images, "epochs": args.epochs, "home": args.home}
    try:
        params = DemoParams.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as e:
        raise InputError(f"bad parameters:\n{e}") from e
    _prepare_runtime()
    server = _start_server_early()
    from flows.demo import demo, print_demo_summary

    result = _run_flow("demo", demo, params, server)
    print_demo_summary(result)
    return EXIT_OK


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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on bad arguments (2)
        return e.code if isinstance(e.code, int) else EXIT_UNUSABLE
    try:
        return args.func(args)
    except MultitagError as e:  # the one place errors become exit codes
        command = " ".join(filter(None, (args.command, getattr(args, "models_command", None))))
        print(f"multitag {command}: {e}", file=sys.stderr)
        return exit_code_of(e)


if __name__ == "__main__":
    raise SystemExit(main())
