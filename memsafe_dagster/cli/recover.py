"""``memsafe recover TARGET``: finish or undo what a crashed writer left in a dataset."""

from __future__ import annotations

import argparse
import json
import sys

from memsafe_dagster.cli._storage import add_storage_option_argument, storage_options_or_exit
from memsafe_dagster.datasets.commit import DatasetLockedError, pending_commits, recover
from memsafe_dagster.datasets.filesystem import resolve_filesystem


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recover",
        help="roll a crashed merge forward (or back) and remove orphaned staging",
        description=(
            "A commit record that was written is applied (the dataset becomes as after the "
            "write); staging without a record is deleted (the dataset stays as before)."
        ),
    )
    parser.add_argument("target", help="dataset directory (path or URL)")
    add_storage_option_argument(parser)
    parser.add_argument(
        "--break-lock",
        action="store_true",
        help="remove a lock whose holder is gone for good (only when no writer runs)",
    )
    parser.add_argument("--lock-timeout", type=float, default=30.0, help="seconds to wait")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    storage_options = storage_options_or_exit(args)
    fs, target = resolve_filesystem(args.target, storage_options=storage_options)
    if not fs.exists(target):
        print(f"memsafe recover: error: {args.target} does not exist", file=sys.stderr)
        return 2
    if not fs.isdir(target):
        print(
            f"memsafe recover: error: {args.target} is a file; recover works on the dataset "
            "directory a merge writes into (the TARGET of `memsafe merge`)",
            file=sys.stderr,
        )
        return 2
    pending = pending_commits(fs, target)
    try:
        report = recover(fs, target, break_lock=args.break_lock, lock_timeout_s=args.lock_timeout)
    except DatasetLockedError as exc:
        print(f"memsafe recover: {exc}", file=sys.stderr)
        return 3
    doc = {
        "target": args.target,
        "pending_before": pending,
        "rolled_forward": report.rolled_forward,
        "orphans_removed": report.orphans_removed,
        "lock_broken": report.lock_broken,
        "changed": report.changed,
    }
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    if not report.changed:
        print(f"{args.target}: clean, nothing to recover")
        return 0
    for txn in report.rolled_forward:
        print(f"rolled forward commit {txn}")
    for txn in report.orphans_removed:
        print(f"removed orphaned staging {txn}")
    if report.lock_broken:
        print("broke a stale lock")
    return 0
