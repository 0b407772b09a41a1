"""The demo's settings as the defs folder sees them: ``SETTINGS`` and ``DAILY`` for its Python
files, and the ``demo`` template variable for its ``defs.yaml`` files
(``template_vars_module: memsafe_dagster.demo.template_vars``, then ``{{ demo.chunk_rows }}``).

Settings come from ``MEMSAFE_DEMO_*`` environment variables, read when the definitions load.
Annotations here stay real objects (no postponed evaluation): Dagster reads them.
"""

from dataclasses import dataclass

import dagster as dg

from memsafe_dagster.demo.settings import DemoSettings

SETTINGS = DemoSettings.from_env()
#: The demo's days: by default exactly the days ``memsafe demo`` runs (see DemoSettings).
DAILY = dg.DailyPartitionsDefinition(start_date=SETTINGS.start_date)


@dataclass(frozen=True)
class DemoVars:
    """What the demo's defs.yaml files read: places as strings, sizes, the partitions."""

    warehouse_orders: str
    warehouse_customers: str
    customers_inbox: str
    chunk_rows: int
    sensor_interval_s: int
    partitions: dg.PartitionsDefinition


@dg.template_var
def demo() -> DemoVars:
    """``{{ demo.warehouse_orders }}``, ``{{ demo.partitions }}``, ..."""
    return DemoVars(
        warehouse_orders=str(SETTINGS.warehouse_orders),
        warehouse_customers=str(SETTINGS.warehouse_customers),
        customers_inbox=str(SETTINGS.customers_inbox),
        chunk_rows=SETTINGS.chunk_rows,
        sensor_interval_s=SETTINGS.sensor_interval_s,
        partitions=DAILY,
    )
