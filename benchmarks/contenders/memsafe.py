"""memsafe-dagster: ``PyarrowDatasetIO.merge`` upserting the source path into a target copy.

The memory parameters default to the engine's acceptance run (issue 4): 384 MB of process
memory inside a 512 MB container. ``--min-available-mb`` is lowered from the library default
(512) because under a 512 MB cap nothing would ever be "available" above that floor.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.contenders._common import KEY, copy_target, run_contender
from memsafe_dagster.datasets import PyarrowDatasetIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory-mb", type=float, default=256, help="PyArrow budget")
    parser.add_argument("--max-process-memory-mb", type=float, default=384, help="RSS budget")
    parser.add_argument("--min-available-mb", type=float, default=64)
    parser.add_argument("--chunk-rows", type=int, default=100_000)


def upsert(
    args: argparse.Namespace, source: str, target: str, storage_options: dict | None = None
) -> dict[str, Any]:
    """Upsert ``source`` into ``target`` with the command line's memory parameters."""
    result = PyarrowDatasetIO(storage_options=storage_options).merge(
        data=source,
        path=target,
        strategy="upsert",
        key_columns=[KEY],
        merge_max_memory_mb=args.max_memory_mb,
        merge_max_process_memory_mb=args.max_process_memory_mb,
        merge_min_system_available_mb=args.min_available_mb,
        merge_chunk_size_rows=args.chunk_rows,
    )
    return result.to_dict()


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """The timed merge; the details are the engine's own ``MergeResult``."""
    return upsert(args, str(args.source), str(args.out))


if __name__ == "__main__":
    run_contender("memsafe", merge, prepare=copy_target, add_arguments=add_arguments)
