"""Three assets that record when they ran, under ``container_executor`` sized from a fake cgroup
root with a 1-CPU quota (MEMSAFE_TEST_CPU_ROOT, MEMSAFE_TEST_TIMES_DIR); loaded by the step
processes of the multiprocess executor, so it lives in its own importable module."""

import os
import time

import dagster as dg

from memsafe_dagster.executor import container_executor


def _make(name: str) -> dg.AssetsDefinition:
    @dg.asset(name=name)
    def timed() -> None:
        start = time.time()
        time.sleep(0.8)
        with open(os.path.join(os.environ["MEMSAFE_TEST_TIMES_DIR"], name), "w") as fh:
            fh.write(f"{start} {time.time()}")

    return timed


ASSETS = [_make(f"timed_{i}") for i in range(3)]


def sized_job() -> dg.JobDefinition:
    executor = container_executor(root=os.environ["MEMSAFE_TEST_CPU_ROOT"])
    return dg.Definitions(
        assets=ASSETS,
        jobs=[dg.define_asset_job("sized_job", selection=ASSETS)],
        executor=executor,
    ).resolve_job_def("sized_job")
