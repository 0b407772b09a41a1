"""A job whose step memsafe stops at EMERGENCY under a budget the process held before the step
began (served by the web UI in test_failure_messages_ui.py, so it lives in its own module)."""

import os
import tempfile

import dagster as dg
import pyarrow as pa

from memsafe_dagster import ChunkedParquetIOManager, MemoryMonitorResource


@dg.asset(retry_policy=dg.RetryPolicy(max_retries=2))
def too_big_for_its_budget() -> pa.Table:
    return pa.table({"id": list(range(5_000))})


defs = dg.Definitions(
    assets=[too_big_for_its_budget],
    jobs=[dg.define_asset_job("doomed_job", selection=[too_big_for_its_budget])],
    resources={
        "io_manager": ChunkedParquetIOManager(
            base_path=os.path.join(tempfile.gettempdir(), "memsafe-ui-failure-io"),
            memory=MemoryMonitorResource(max_process_memory_mb=1),
        )
    },
)
