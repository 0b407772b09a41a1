"""A streaming asset of N rows through ChunkedParquetIOManager, run as a child process so the
OS reports its peak RSS: ``python dagster_defs_big_stream.py ROWS BASE_DIR [stream|table]``.

``stream`` returns a ``ChunkStream`` over a generator (never more than a chunk in memory);
``table`` returns one ``pa.Table`` of all rows (the contrast that shows the test can fail).
Prints the materialization's metadata and the process's VmHWM as one JSON line.

No ``from __future__ import annotations`` here: this module defines assets.
"""

import json
import sys

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from memsafe_dagster.datasets import ChunkStream
from memsafe_dagster.io_managers import ChunkedParquetIOManager
from memsafe_dagster.memory.process import peak_rss_bytes
from memsafe_dagster.resources import MemoryMonitorResource

BATCH_ROWS = 50_000
CHUNK_ROWS = 100_000
_NAMES = pa.array([f"customer-{i % 1000:04d}" for i in range(BATCH_ROWS)])


def batches(rows: int):
    for start in range(0, rows, BATCH_ROWS):
        n = min(BATCH_ROWS, rows - start)
        ids = pa.array(range(start, start + n), pa.int64())
        yield pa.record_batch(
            {"id": ids, "value": pc.multiply(ids, 0.5), "name": _NAMES.slice(0, n)}
        )


def build(rows: int, mode: str) -> dg.AssetsDefinition:
    if mode == "stream":

        @dg.asset(name="big")
        def big_stream() -> ChunkStream:
            return ChunkStream.from_batches(batches(rows))

        return big_stream

    @dg.asset(name="big")
    def big_table() -> pa.Table:
        return pa.Table.from_batches(list(batches(rows)))

    return big_table


def main(rows: int, base: str, mode: str) -> None:
    instance = dg.DagsterInstance.ephemeral()
    io_manager = ChunkedParquetIOManager(
        base_path=base,
        chunk_size_rows=CHUNK_ROWS,
        memory=MemoryMonitorResource(max_pyarrow_mb=4096),
    )
    result = dg.materialize(
        [build(rows, mode)], resources={"io_manager": io_manager}, instance=instance
    )
    assert result.success
    event = instance.get_latest_materialization_event(dg.AssetKey("big"))
    meta = event.asset_materialization.metadata
    out = {k: v.value for k, v in meta.items() if k.startswith(("memsafe/", "dagster/row"))}
    # The kernel's high-water mark of this process's RSS (VmHWM) at exit, for a cross-check.
    out["vm_hwm_mb"] = (peak_rss_bytes() or 0) / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "stream")
