"""Relaunch after a memory failure: the failure sensor, evaluated against a real instance,
answers a run stopped at EMERGENCY with one run of the same asset and partition, a raised
``dagster-k8s/config`` memory limit (parsed by dagster-k8s itself) and a raised memsafe budget;
the relaunched run succeeds; evaluating again makes no duplicate; relaunches are bounded."""

import dagster as dg
import pytest
from dagster_helpers import failure_context
from dagster_k8s.job import get_user_defined_k8s_config

from memsafe_dagster import MemoryMonitorResource, build_memsafe_failure_sensor
from memsafe_dagster import metadata as md
from memsafe_dagster.k8s import memory_limit_mb, with_memory
from memsafe_dagster.memory.process import current_rss_bytes
from memsafe_dagster.memory.sizes import MiB
from memsafe_dagster.sensors import (
    RELAUNCH_ATTEMPT_TAG,
    RELAUNCH_CAUSE_TAG,
    RELAUNCH_OF_TAG,
    RELAUNCH_ROOT_TAG,
)

PARTS = dg.StaticPartitionsDefinition(["a", "b"])
ALLOC_MB = 150


@dg.asset(partitions_def=PARTS)
def grows(context: dg.AssetExecutionContext, memory: MemoryMonitorResource) -> None:
    with memory.track(context) as tracker:
        block = bytearray(ALLOC_MB * MiB)
        for i in range(0, len(block), 4096):
            block[i] = 1
        tracker.check("holding the block")
        del block


@dg.asset(partitions_def=PARTS)
def other(context: dg.AssetExecutionContext) -> None:
    pass


@dg.asset
def always_over(context: dg.AssetExecutionContext, memory: MemoryMonitorResource) -> None:
    with memory.track(context) as tracker:
        raise tracker.failure(detail="stays over whatever the budget")


def _defs(budget_mb: int) -> dg.Definitions:
    memory = MemoryMonitorResource(max_process_memory_mb=budget_mb)
    grows_job = dg.define_asset_job(
        "grows_job",
        selection=[grows, other],
        tags=with_memory({"team": "data"}, request_mb=512, limit_mb=1024),
    )
    over_job = dg.define_asset_job("over_job", selection=[always_over])
    return dg.Definitions(
        assets=[grows, other, always_over],
        jobs=[grows_job, over_job],
        resources={"memory": memory},
    )


def _launch(job: dg.JobDefinition, instance: dg.DagsterInstance, request: dg.RunRequest):
    """What the sensor daemon does with a request: a run of the job with its config and tags."""
    return job.execute_in_process(
        instance=instance,
        run_config=request.run_config,
        tags=request.tags,
        partition_key=request.partition_key,
        asset_selection=request.asset_selection,
        raise_on_error=False,
    )


def test_a_run_stopped_at_emergency_is_relaunched_with_more_memory_and_succeeds() -> None:
    # The budget sits 60 MB above what the process holds; the step touches 150 MB more.
    budget = int(current_rss_bytes() / MiB) + 60
    defs = _defs(budget)
    job = defs.resolve_job_def("grows_job")
    sensor = build_memsafe_failure_sensor(relaunch=True, max_relaunches=2, monitored_jobs=[job])
    with dg.instance_for_test() as instance:
        failed = job.execute_in_process(
            instance=instance, partition_key="b", asset_selection=[grows.key], raise_on_error=False
        )
        assert not failed.success
        [failure] = failed.get_step_failure_events()
        user = failure.step_failure_data.user_failure_data
        assert user.description.startswith(md.FAILURE_PREFIX)
        assert f"max_process_memory_mb {budget}" in user.description

        with failure_context(instance, failed.run_id) as context:
            request = sensor(context)
        assert isinstance(request, dg.RunRequest), request
        assert request.asset_selection == [grows.key]
        assert request.partition_key == "b"
        assert request.job_name == "grows_job"
        assert request.tags[RELAUNCH_OF_TAG] == failed.run_id
        assert request.tags[RELAUNCH_ROOT_TAG] == failed.run_id
        assert request.tags[RELAUNCH_ATTEMPT_TAG] == "1"
        assert "max_process_memory_mb" in request.tags[RELAUNCH_CAUSE_TAG]
        assert request.tags["team"] == "data"
        assert request.run_key == f"memsafe-relaunch-{failed.run_id}-1"
        # dagster-k8s's own parser reads the raised limit (and keeps the request).
        parsed = get_user_defined_k8s_config(request.tags)
        assert parsed.container_config["resources"]["limits"]["memory"] == "1536Mi"
        assert parsed.container_config["resources"]["requests"]["memory"] == "512Mi"
        raised = request.run_config["resources"]["memory"]["config"]["max_process_memory_mb"]
        assert raised > budget + ALLOC_MB  # 1.5 x the failed peak

        # The failed run is tagged with the short diagnosis, naming the same budget.
        diagnosis = instance.get_run_by_id(failed.run_id).tags["memsafe/diagnosis"]
        assert f"max_process_memory_mb {budget} MB bound" in diagnosis

        relaunched = _launch(job, instance, request)
        assert relaunched.success
        run = instance.get_run_by_id(relaunched.run_id)
        assert run.tags[RELAUNCH_OF_TAG] == failed.run_id
        assert run.tags["dagster/partition"] == "b"
        assert memory_limit_mb(run.tags) == 1536
        event = instance.get_latest_materialization_event(grows.key)
        assert event.run_id == relaunched.run_id
        assert event.asset_materialization.partition == "b"

        # A second evaluation of the same failure makes no duplicate.
        for _ in range(3):
            with failure_context(instance, failed.run_id) as context:
                again = sensor(context)
            assert isinstance(again, dg.SkipReason), again
            assert "already exists" in again.skip_message
        relaunches = instance.get_run_ids(dg.RunsFilter(tags={RELAUNCH_OF_TAG: failed.run_id}))
        assert len(relaunches) == 1


def test_relaunches_are_bounded_per_original_run() -> None:
    defs = _defs(100_000)
    job = defs.resolve_job_def("over_job")
    sensor = build_memsafe_failure_sensor(relaunch=True, max_relaunches=2, monitored_jobs=[job])
    with dg.instance_for_test() as instance:
        original = job.execute_in_process(instance=instance, raise_on_error=False)
        run_id, attempts = original.run_id, []
        limits = []
        for _ in range(4):
            with failure_context(instance, run_id) as context:
                answer = sensor(context)
            if not isinstance(answer, dg.RunRequest):
                assert "already relaunched 2 time(s)" in answer.skip_message
                break
            assert answer.tags[RELAUNCH_ROOT_TAG] == original.run_id
            attempts.append(answer.tags[RELAUNCH_ATTEMPT_TAG])
            limits.append(memory_limit_mb(answer.tags))
            result = _launch(job, instance, answer)
            assert not result.success  # this asset never fits
            run_id = result.run_id
        assert attempts == ["1", "2"]
        assert limits[1] == pytest.approx(limits[0] * 1.5, abs=1)  # raised again each time


def test_a_merge_failure_with_data_pressure_halves_the_chunk() -> None:
    from memsafe_dagster.sensors import FailureDiagnosis, plan_relaunch

    run = dg.DagsterRun(
        job_name="merges",
        run_id="r1",
        tags=with_memory({"dagster/partition": "2025-01-01"}, request_mb=None, limit_mb=2048),
        run_config={"ops": {"orders": {"config": {"merge_chunk_size_rows": 40_000}}}},
    )
    diagnosis = FailureDiagnosis(
        step_key="orders",
        kind="memsafe-emergency",
        text="",
        peak_rss_mb=900.0,
        limit_mb=2048.0,
        binding="max_pyarrow_mb",
        binding_mb=600.0,
        chunks_help=True,
        chunk_size_rows=40_000,
        chunk_config="merge_chunk_size_rows",
    )
    request, why = plan_relaunch(run, diagnosis)
    assert request.run_config["ops"]["orders"]["config"]["merge_chunk_size_rows"] == 20_000
    assert request.run_config["resources"]["memory"]["config"]["max_pyarrow_mb"] == 900
    assert memory_limit_mb(request.tags) == 3072
    assert request.partition_key == "2025-01-01"
    assert "merge_chunk_size_rows -> 20000" in why
    # Where the process held the budget before the step, the chunk is left alone.
    baseline_bound = FailureDiagnosis(**{**diagnosis.__dict__, "chunks_help": False})
    request, _why = plan_relaunch(run, baseline_bound)
    assert request.run_config["ops"]["orders"]["config"]["merge_chunk_size_rows"] == 40_000


def test_relaunch_needs_jobs() -> None:
    with pytest.raises(ValueError, match="needs the jobs it may relaunch"):
        build_memsafe_failure_sensor(relaunch=True)


def test_an_oom_killed_step_is_relaunched_with_a_raised_limit() -> None:
    """A real SIGKILL of the step's own process under the multiprocess executor."""

    tags = with_memory({}, request_mb=None, limit_mb=2048)
    with dg.instance_for_test() as instance:
        job = dg.build_reconstructable_job("tests.dagster_defs_killed", "killed_job")
        result = dg.execute_job(job, instance=instance, tags=tags, raise_on_error=False)
        assert not result.success
        sensor = build_memsafe_failure_sensor(
            relaunch=True, relaunch_jobs=[dg.define_asset_job("killed_job")]
        )
        with failure_context(instance, result.run_id) as context:
            request = sensor(context)
        assert isinstance(request, dg.RunRequest), request
        assert request.tags[RELAUNCH_CAUSE_TAG].startswith("OOM-killed: step killed_by_the_kernel")
        assert (
            get_user_defined_k8s_config(request.tags).container_config["resources"]["limits"][
                "memory"
            ]
            == "3072Mi"
        )
        assert "resources" not in request.run_config  # no memsafe budget bound
        # Without a limit on the run nothing says how much more to ask for: no relaunch.
        bare = dg.execute_job(job, instance=instance, raise_on_error=False)
        with failure_context(instance, bare.run_id) as context:
            skipped = sensor(context)
        assert isinstance(skipped, dg.SkipReason)
        assert "limit the step died under is unknown" in skipped.skip_message
