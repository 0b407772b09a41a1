"""Three assets that each touch ALLOC_MB of fresh memory for HOLD_S inside ``memory.track``,
run side by side by the multiprocess executor (loaded by its step processes, so it lives in its
own importable module). Configured through the environment of the run's process:
MEMSAFE_TEST_ADMISSION (1/0), MEMSAFE_TEST_ALLOC_MB, MEMSAFE_TEST_HOLD_S,
MEMSAFE_TEST_EXPECTED_PEAK_MB."""

import json
import os
import sys
import tempfile
import time

import dagster as dg

from memsafe_dagster import MemoryMonitorResource

ALLOC_MB = int(os.environ.get("MEMSAFE_TEST_ALLOC_MB", "200"))
HOLD_S = float(os.environ.get("MEMSAFE_TEST_HOLD_S", "1.5"))
EXPECTED_PEAK_MB = float(os.environ.get("MEMSAFE_TEST_EXPECTED_PEAK_MB", "0")) or None


def _make(name: str) -> dg.AssetsDefinition:
    metadata = {"memsafe/expected_peak_mb": EXPECTED_PEAK_MB} if EXPECTED_PEAK_MB else {}

    @dg.asset(name=name, metadata=metadata)
    def heavy(context: dg.AssetExecutionContext, memory: MemoryMonitorResource) -> None:
        with memory.track(context) as tracker:
            block = bytearray(ALLOC_MB * 1024 * 1024)
            for i in range(0, len(block), 4096):  # touch every page: resident, not just mapped
                block[i] = 1
            time.sleep(HOLD_S)
            del block
        context.log.info(f"done {tracker.figures.peak_rss_mb:.0f}")

    return heavy


ASSETS = [_make(f"heavy_{i}") for i in range(3)]


def admission_job() -> dg.JobDefinition:
    on = os.environ.get("MEMSAFE_TEST_ADMISSION", "1") == "1"
    return dg.Definitions(
        assets=ASSETS,
        jobs=[dg.define_asset_job("admission_job", selection=ASSETS)],
        resources={
            "memory": MemoryMonitorResource(
                admission=on,
                admission_timeout_s=60,
                # Budgets far above the cap: only admission (or the kernel) acts here.
                profile="explicit",
                max_pyarrow_mb=100000,
                max_process_memory_mb=100000,
                min_system_available_mb=1,
            )
        },
    ).resolve_job_def("admission_job")


def main() -> None:
    """Run the job with three concurrent step processes; print what happened as JSON."""
    with tempfile.TemporaryDirectory() as home, dg.DagsterInstance.local_temp(home) as instance:
        result = dg.execute_job(
            dg.reconstructable(admission_job),
            instance=instance,
            run_config={"execution": {"config": {"multiprocess": {"max_concurrent": 3}}}},
        )
        failures = [e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        meta = {}
        for asset in ASSETS:
            event = instance.get_latest_materialization_event(asset.key)
            if event is not None:
                m = event.asset_materialization.metadata
                meta[asset.key.to_user_string()] = {
                    k: m[k].value for k in m if k.startswith("memsafe/")
                }
        waits = [
            e.message
            for e in instance.all_logs(result.run_id)
            if e.message and "memsafe: admission" in e.message
        ]
        print(
            json.dumps(
                {"success": result.success, "failed": failures, "meta": meta, "waits": waits}
            )
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
