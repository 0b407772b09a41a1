"""A job whose step process is killed with SIGKILL, as the OOM killer does (loaded by the step
processes of the multiprocess executor, so it lives in its own importable module)."""

import os
import signal

import dagster as dg


@dg.asset
def killed_by_the_kernel() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def killed_job() -> dg.JobDefinition:
    return dg.Definitions(
        assets=[killed_by_the_kernel],
        jobs=[dg.define_asset_job("killed_job", selection=[killed_by_the_kernel])],
    ).resolve_job_def("killed_job")
