"""memsafe-dagster: ``merge_iceberg`` upserting the source path into an Iceberg copy of the target.

One snapshot, the same memory parameters as the ``memsafe`` contender (384 MB of process
memory, 256 MB PyArrow, a 64 MB free-memory floor: the 512 MB container of the acceptance run).
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.contenders import _iceberg
from benchmarks.contenders._common import KEY, run_contender
from benchmarks.contenders.memsafe import _add_arguments


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """The timed merge; the details are the engine's own ``IcebergMergeResult``."""
    from memsafe_dagster.datasets import merge_iceberg

    table = _iceberg.catalog(args.out).load_table(_iceberg.TABLE)
    result = merge_iceberg(
        str(args.source),
        table,
        "upsert",
        [KEY],
        merge_max_memory_mb=args.max_memory_mb,
        merge_max_process_memory_mb=args.max_process_memory_mb,
        merge_min_system_available_mb=args.min_available_mb,
        merge_chunk_size_rows=args.chunk_rows,
    )
    snapshots = [s.summary.operation.value for s in table.snapshots()]
    return {**result.to_dict(), "snapshots": snapshots}


if __name__ == "__main__":
    run_contender(
        "iceberg_memsafe",
        merge,
        prepare=_iceberg.prepare,
        add_arguments=_add_arguments,
        output_format="iceberg",
    )
