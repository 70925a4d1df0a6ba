"""The `multitag` command line: one small function per subcommand.

Why argparse and lazy imports: `multitag --help` and `multitag validate` must answer in well
under a second on a loaded machine, so this module imports only the standard library at load
time; each `_cmd_<name>` imports what it needs (pandas, torch, prefect) when it runs.

Exit codes: 0 success, 1 the command ran and found a problem (e.g. a broken data contract),
2 the input could not be used (bad arguments, no such folder, unreadable file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multitag",
        description="Train multi-label image classifiers and bulk-tag image folders and buckets.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_validate(sub)
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
    from multitag.contracts import ContractError, DatasetUnusableError, validate_dataset

    try:
        report = validate_dataset(args.dataset_dir, check_images=not args.skip_images)
    except DatasetUnusableError as e:
        print(f"multitag validate: cannot use this dataset: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    except ContractError as e:
        print(f"multitag validate: the data contract itself is broken: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on bad arguments (2)
        return e.code if isinstance(e.code, int) else EXIT_UNUSABLE
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
