"""fsspeckit 0.25 ``PyarrowDatasetIO.merge`` with the seed's "Safe Merging in Limited Memory"
parameters, in place on a copy of the target. Its key selection is quadratic: run it bounded.
"""

from __future__ import annotations

import argparse
from typing import Any

import fsspeckit
import pyarrow.dataset as ds
from fsspeckit.datasets.pyarrow.io import PyarrowDatasetIO

from benchmarks.contenders._common import KEY, copy_target, run_contender


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """The seed's call, its progress callback counting instead of printing."""
    calls = 0

    def progress(_current: int, _total: int) -> None:
        nonlocal calls
        calls += 1

    source = ds.dataset(args.source, format="parquet").to_table()
    result = PyarrowDatasetIO().merge(
        data=source,
        path=str(args.out),
        strategy="upsert",
        key_columns=[KEY],
        merge_max_memory_mb=256,
        merge_max_process_memory_mb=512,
        merge_min_system_available_mb=128,
        merge_chunk_size_rows=10_000,
        enable_streaming_merge=True,
        merge_progress_callback=progress,
    )
    return {
        "fsspeckit": fsspeckit.__version__,
        "inserted": result.inserted,
        "updated": result.updated,
        "progress_calls": calls,
    }


if __name__ == "__main__":
    run_contender("fsspeckit", merge, prepare=copy_target)
