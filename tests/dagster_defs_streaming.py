"""The streaming asset graph of the IO manager acceptance tests, in-process and through the CLI.

raw_events (a generator of BATCHES batches, streamed) -> positive_events (ChunkStream in,
filtered ChunkStream out) -> large_amounts (a lazy Dataset in, with columns and filter pushed
down, written back by streaming it) -> amount_summary (a pa.Table in).

No ``from __future__ import annotations`` here: Dagster reads these annotations at runtime.
"""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from memsafe_dagster.datasets import ChunkStream
from memsafe_dagster.io_managers import ChunkedParquetIOManager
from memsafe_dagster.resources import MemoryMonitorResource

BATCHES = 12
BATCH_ROWS = 1_000
CHUNK_ROWS = 2_500
ROWS = BATCHES * BATCH_ROWS
# amount = id % 10 - 3: ids ending in 4..9 are positive, those ending in 8, 9 are >= 5.
POSITIVE_ROWS = ROWS * 6 // 10
LARGE_ROWS = ROWS * 2 // 10
LARGE_TOTAL = (ROWS // 10) * (5 + 6)

# What the generator produced and what the ChunkStream consumer saw (in-process runs only).
PRODUCED_BATCHES: list[int] = []
SEEN_CHUNK_ROWS: list[int] = []


def event_batches():
    for i in range(BATCHES):
        PRODUCED_BATCHES.append(i)
        ids = range(i * BATCH_ROWS, (i + 1) * BATCH_ROWS)
        yield pa.record_batch(
            {
                "id": pa.array(ids, pa.int64()),
                "amount": pa.array([j % 10 - 3 for j in ids], pa.int64()),
                "label": pa.array([f"event-{j % 5}" for j in ids]),
            }
        )


def _seen(table: pa.Table) -> pa.Table:
    SEEN_CHUNK_ROWS.append(table.num_rows)
    return table


@dg.asset
def raw_events() -> ChunkStream:
    return ChunkStream.from_batches(event_batches())


@dg.asset
def positive_events(raw_events: ChunkStream) -> ChunkStream:
    return ChunkStream.from_batches(_seen(t).filter(pc.field("amount") > 0) for t in raw_events)


@dg.asset(
    ins={
        "positive_events": dg.AssetIn(
            metadata={"columns": ["id", "amount"], "filter": [("amount", ">=", 5)]}
        )
    }
)
def large_amounts(positive_events: ds.Dataset) -> ds.Dataset:
    assert isinstance(positive_events, ds.Dataset)
    assert positive_events.schema.names == ["id", "amount"]
    return positive_events


@dg.asset
def amount_summary(large_amounts: pa.Table) -> pa.Table:
    assert isinstance(large_amounts, pa.Table)
    return pa.table(
        {
            "rows": pa.array([large_amounts.num_rows], pa.int64()),
            "total_amount": pa.array([pc.sum(large_amounts["amount"]).as_py()], pa.int64()),
        }
    )


ASSETS = [raw_events, positive_events, large_amounts, amount_summary]


def resources(base_path: str | None = None, **memory: object) -> dict[str, object]:
    """The IO manager of the graph (default base: the instance's storage directory)."""
    return {
        "io_manager": ChunkedParquetIOManager(
            base_path=base_path,
            chunk_size_rows=CHUNK_ROWS,
            memory=MemoryMonitorResource(**memory),
        )
    }


defs = dg.Definitions(assets=ASSETS, resources=resources())
