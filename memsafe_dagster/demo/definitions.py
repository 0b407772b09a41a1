"""The demo's Definitions: a daily orders pipeline streamed in chunks into a warehouse, and an
inbox of CRM exports merged into a customers table. ``workspace.yaml`` loads this module.

    orders_raw (generated chunk by chunk) -> orders_clean (ChunkStream -> ChunkStream)
        -> warehouse_orders (upsert by order_id into one dataset, one partition per run)
    inbox/customers/*.parquet -> warehouse_customers (upsert by customer_id; inbox sensor)

Plus the daily schedule of the orders job, the inbox sensor (memory-gated) and the memsafe
run-failure sensor. Sizes and places: ``memsafe_dagster.demo.settings``.

Annotations here stay real objects (no postponed evaluation): Dagster reads them at runtime.
"""

import dagster as dg

from memsafe_dagster.datasets import ChunkStream
from memsafe_dagster.demo import data
from memsafe_dagster.demo.settings import DemoSettings
from memsafe_dagster.io_managers import ChunkedParquetIOManager
from memsafe_dagster.merge_asset import build_merge_asset
from memsafe_dagster.resources import MemoryMonitorResource
from memsafe_dagster.schedules import build_merge_job, build_merge_schedule
from memsafe_dagster.sensors import build_inbox_sensor, build_memsafe_failure_sensor

SETTINGS = DemoSettings.from_env()
DAILY = dg.DailyPartitionsDefinition(start_date=SETTINGS.start_date)


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


warehouse_orders = build_merge_asset(
    "warehouse_orders",
    source=orders_clean,
    target_path=str(SETTINGS.warehouse_orders),
    key_columns="order_id",
    strategy="upsert",
    merge_chunk_size_rows=SETTINGS.chunk_rows,
    retry_policy=dg.RetryPolicy(max_retries=2),
    group_name="warehouse",
    description="Every order's latest state: each day's orders upserted by order_id.",
)

warehouse_customers = build_merge_asset(
    "warehouse_customers",
    source=str(SETTINGS.customers_inbox),
    target_path=str(SETTINGS.warehouse_customers),
    key_columns="customer_id",
    strategy="upsert",
    on_duplicate_keys="last",
    merge_chunk_size_rows=SETTINGS.chunk_rows,
    retry_policy=dg.RetryPolicy(max_retries=2),
    group_name="warehouse",
    description="Customers from CRM exports dropped into the inbox (newest export wins).",
)

orders_job = build_merge_job(warehouse_orders, name="orders_job")
orders_schedule = build_merge_schedule(orders_job, name="orders_daily", hour_of_day=1)
customers_job = dg.define_asset_job(
    "customers_job",
    selection=[warehouse_customers],
    description="Merges the CRM exports waiting in the inbox into warehouse_customers.",
)
customers_inbox_sensor = build_inbox_sensor(
    name="customers_inbox",
    target=warehouse_customers,
    job=customers_job,
    minimum_interval_seconds=SETTINGS.sensor_interval_s,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
failure_sensor = build_memsafe_failure_sensor()

ASSETS = [orders_raw, orders_clean, warehouse_orders, warehouse_customers]


def resources(settings: DemoSettings = SETTINGS) -> dict[str, object]:
    """The IO manager of the intermediate assets and the memory budget of every step."""
    memory = MemoryMonitorResource()
    return {
        "io_manager": ChunkedParquetIOManager(
            base_path=str(settings.io_dir), chunk_size_rows=settings.chunk_rows, memory=memory
        ),
        "memory": memory,
    }


defs = dg.Definitions(
    assets=ASSETS,
    jobs=[orders_job, customers_job],
    schedules=[orders_schedule],
    sensors=[customers_inbox_sensor, failure_sensor],
    resources=resources(),
)


def orders_job_def() -> dg.JobDefinition:
    """The resolved orders job (for ``build_reconstructable_job``)."""
    return defs.resolve_job_def("orders_job")


def customers_job_def() -> dg.JobDefinition:
    """The resolved customers job (for ``build_reconstructable_job``)."""
    return defs.resolve_job_def("customers_job")
