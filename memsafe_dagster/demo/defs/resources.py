"""The IO manager of the intermediate assets, budgeted by the same memory resource object the
``memory`` component provides (equal configurations share one ``MemoryMonitorResource``)."""

import dagster as dg

from memsafe_dagster.components import shared_memory_resource
from memsafe_dagster.demo.template_vars import SETTINGS
from memsafe_dagster.io_managers import ChunkedParquetIOManager


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "io_manager": ChunkedParquetIOManager(
                base_path=str(SETTINGS.io_dir),
                chunk_size_rows=SETTINGS.chunk_rows,
                memory=shared_memory_resource(),
            )
        }
    )
