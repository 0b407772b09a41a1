"""The orders pipeline before the warehouse: a day of raw orders generated chunk by chunk, and
its cleaned stream (``ChunkStream -> ChunkStream``, stored by ``ChunkedParquetIOManager``).

Annotations here stay real objects (no postponed evaluation): Dagster reads them at runtime.
"""

import dagster as dg

from memsafe_dagster.datasets import ChunkStream
from memsafe_dagster.demo import data
from memsafe_dagster.demo.template_vars import DAILY, SETTINGS


@dg.asset(
    partitions_def=DAILY,
    group_name="orders",
    kinds={"parquet"},
    description="A day of orders from the shop's event stream, generated chunk by chunk.",
)
def orders_raw(context: dg.AssetExecutionContext) -> ChunkStream:
    day = context.partition_key
    batches = data.order_batches(
        day,
        SETTINGS.day_index(day),
        SETTINGS.orders_per_day,
        SETTINGS.chunk_rows,
        SETTINGS.customers,
        first_id=SETTINGS.first_order_id,
    )
    return ChunkStream.from_batches(batches, schema=data.ORDER_SCHEMA)


@dg.asset(
    partitions_def=DAILY,
    group_name="orders",
    kinds={"parquet"},
    description="Orders without dirty rows, currencies normalized, amounts in EUR (streamed).",
)
def orders_clean(orders_raw: ChunkStream) -> ChunkStream:
    return ChunkStream.from_batches(
        (data.clean_orders(chunk) for chunk in orders_raw), schema=data.CLEAN_SCHEMA
    )
