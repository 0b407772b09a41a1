"""``memsafe merge SOURCE TARGET --key COL``: merge Parquet into a dataset, with a progress bar."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from memsafe_dagster.cli._monitor_options import add_size_option
from memsafe_dagster.cli._storage import add_storage_option_argument, storage_options_or_exit
from memsafe_dagster.datasets.commit import CommitConflictError, DatasetLockedError
from memsafe_dagster.datasets.filesystem import resolve_filesystem
from memsafe_dagster.datasets.merge import STRATEGIES
from memsafe_dagster.memory import detect_memory_limits
from memsafe_dagster.memory.sizes import MiB


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge a source into a Parquet dataset by key columns, in bounded memory",
        description=(
            "Merge the Parquet file(s) at SOURCE into the dataset at TARGET (any fsspec URL). "
            "Only files holding matched keys are rewritten; the commit survives kill -9 "
            "(run `memsafe recover TARGET` after a crash, or just merge again)."
        ),
    )
    parser.add_argument("source", help="Parquet file or directory (path or URL)")
    parser.add_argument("target", help="target dataset directory (path or URL; may not exist)")
    add_storage_option_argument(parser)
    parser.add_argument(
        "--key",
        action="append",
        required=True,
        metavar="COL",
        help="key column; repeat (or use a,b) for a composite key",
    )
    parser.add_argument("--strategy", choices=STRATEGIES, default="upsert")
    add_size_option(
        parser, "--max-memory", "process memory budget (default: 60%% of the detected limit)"
    )
    add_size_option(parser, "--max-pyarrow", "PyArrow budget (default: the process budget)")
    add_size_option(
        parser,
        "--min-available",
        "stop when less than this stays available (default: 10%% of the limit, <= 256MB)",
    )
    parser.add_argument("--chunk-rows", type=int, default=100_000, help="rows per chunk")
    parser.add_argument("--on-duplicate-keys", choices=("error", "first", "last"), default="error")
    parser.add_argument(
        "--missing-columns",
        choices=("error", "null"),
        default="error",
        help="target columns the source lacks: refuse (default) or write nulls",
    )
    parser.add_argument(
        "--allow-empty-source",
        action="store_true",
        help="let full_merge with an empty source empty the target (refused otherwise)",
    )
    parser.add_argument("--row-group-size", type=int, help="rows per row group written")
    parser.add_argument("--target-file-rows", type=int, help="rows per new file")
    parser.add_argument("--compression", help="codec of written files (default: the target's)")
    parser.add_argument("--lock-timeout", type=float, default=30.0, help="seconds to wait")
    parser.add_argument("--json", action="store_true", help="print the MergeResult as JSON")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    parser.set_defaults(handler=run)


# Parameter names in the library's error messages, as this command spells them.
PYTHON_TO_FLAGS = (
    ("pass on_duplicate_keys='first' or 'last'", "pass --on-duplicate-keys first|last"),
    ("missing_columns='null'", "--missing-columns null"),
    ("allow_empty_source=True", "--allow-empty-source"),
    ("merge_chunk_size_rows", "--chunk-rows"),
    ("raise the memory budget", "raise --max-memory"),
)


def budgets(args: argparse.Namespace) -> dict[str, float]:
    """The memory parameters of ``merge_dataset`` from the command line and detected limit."""
    limit_mb = detect_memory_limits().limit_bytes / MiB
    process_mb = args.max_memory if args.max_memory is not None else round(limit_mb * 0.6)
    pyarrow_mb = args.max_pyarrow if args.max_pyarrow is not None else process_mb
    available_mb = (
        args.min_available if args.min_available is not None else min(256.0, round(limit_mb * 0.1))
    )
    if process_mb <= 0 or pyarrow_mb <= 0:
        raise ValueError("--max-memory and --max-pyarrow must be positive sizes")
    return {
        "merge_max_process_memory_mb": process_mb,
        "merge_max_memory_mb": pyarrow_mb,
        "merge_min_system_available_mb": available_mb,
    }


class _Bar:
    """A tqdm bar fed by ``merge_progress_callback(done, total)``."""

    def __init__(self) -> None:
        from tqdm import tqdm

        try:
            size = os.get_terminal_size(sys.stderr.fileno())
        except (OSError, ValueError):
            size = os.terminal_size((0, 0))
        # A terminal that reports no size (a fresh pty) would otherwise hide the bar.
        self.bar = tqdm(
            total=0,
            unit="row",
            unit_scale=True,
            desc="merge",
            file=sys.stderr,
            ncols=size.columns or 100,
            nrows=size.lines or 24,
        )

    def __call__(self, done: int, total: int) -> None:
        if total != self.bar.total:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run(args: argparse.Namespace) -> int:
    from memsafe_dagster.datasets.merge import merge_dataset

    keys = [k.strip() for value in args.key for k in value.split(",") if k.strip()]
    options: dict[str, Any] = {
        "lock_timeout_s": args.lock_timeout,
        "missing_columns": args.missing_columns,
        "allow_empty_source": args.allow_empty_source,
    }
    if args.row_group_size is not None:
        options["row_group_size"] = args.row_group_size
    if args.target_file_rows is not None:
        options["target_file_rows"] = args.target_file_rows
    if args.compression is not None:
        options["compression"] = args.compression
    storage_options = storage_options_or_exit(args)
    fs, target = resolve_filesystem(args.target, storage_options=storage_options)
    source: Any = args.source
    if "://" not in source and "://" in args.target:
        # A plain SOURCE path is a local file, even when TARGET is a URL (the library reads a
        # plain path on the target's filesystem). A URL SOURCE is read by merge_dataset: through
        # the target's filesystem for the same protocol, with the storage options otherwise.
        source = f"file://{os.path.abspath(source)}"
    show = sys.stderr.isatty() if args.progress is None else args.progress
    bar = _Bar() if show else None
    try:
        result = merge_dataset(
            source,
            target,
            fs=fs,
            storage_options=storage_options,
            strategy=args.strategy,
            key_columns=keys,
            merge_chunk_size_rows=args.chunk_rows,
            on_duplicate_keys=args.on_duplicate_keys,
            merge_progress_callback=bar,
            **budgets(args),
            **options,
        )
    except (DatasetLockedError, CommitConflictError) as exc:
        print(f"memsafe merge: {exc}", file=sys.stderr)
        return 3
    except (ValueError, MemoryError) as exc:
        # The library's advice names Python parameters; name this command's options.
        message = str(exc)
        for python, flag in PYTHON_TO_FLAGS:
            message = message.replace(python, flag)
        if isinstance(exc, MemoryError) and args.max_memory is None:
            limit_mb = detect_memory_limits().limit_bytes / MiB
            message += (
                f" (--max-memory defaults to 60 % of the {limit_mb:.0f} MB limit, which leaves "
                "little above a Python process's own baseline under a small limit)"
            )
        print(f"memsafe merge: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return 0
    r = result
    print(
        f"{r.strategy} into {args.target}: {r.source_count:,} source rows -> "
        f"{r.inserted:,} inserted, {r.updated:,} updated, {r.deleted:,} deleted; "
        f"{r.target_count_before:,} -> {r.target_count_after:,} rows"
    )
    print(
        f"files: {r.files_rewritten} rewritten, {r.files_compacted} small ones compacted, "
        f"{r.files_added} added, {r.files_removed} removed, {r.files_untouched} untouched "
        f"({r.files_pruned} pruned by statistics)"
    )
    print(
        f"{r.duration_s:.2f}s, peak RSS {r.peak_rss_mb:.0f} MB, peak PyArrow "
        f"{r.peak_pyarrow_mb:.0f} MB, max pressure {r.max_pressure.value.upper()}"
    )
    return 0
