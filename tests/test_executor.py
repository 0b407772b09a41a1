"""container_executor: the multiprocess executor's max_concurrent from the cgroup CPU quota."""

import itertools
import os
import sys
from pathlib import Path

import dagster as dg
import pytest

from memsafe_dagster.executor import container_cpus, container_executor, container_max_concurrent

HERE = Path(__file__).resolve().parent


def _fake_root(tmp_path: Path, version: int, quota: str, period: str = "100000") -> str:
    root = tmp_path / f"root-v{version}-{quota.replace(' ', '_')}"
    (root / "proc/self").mkdir(parents=True)
    if version == 2:
        (root / "proc/self/cgroup").write_text("0::/kubepods/pod1\n")
        leaf = root / "sys/fs/cgroup/kubepods/pod1"
        leaf.mkdir(parents=True)
        (leaf / "cpu.max").write_text(f"{quota} {period}\n")
        (root / "sys/fs/cgroup/cpu.max").write_text("max 100000\n")
    else:
        (root / "proc/self/cgroup").write_text(
            "4:memory:/kubepods/pod1\n3:cpu,cpuacct:/kubepods/pod1\n"
        )
        leaf = root / "sys/fs/cgroup/cpu,cpuacct/kubepods/pod1"
        leaf.mkdir(parents=True)
        (leaf / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (leaf / "cpu.cfs_period_us").write_text(f"{period}\n")
    return str(root)


def _usable() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize("version", [1, 2])
def test_cpu_quota_is_read_and_rounded_up(tmp_path: Path, version: int) -> None:
    assert container_cpus(_fake_root(tmp_path, version, "100000")) == 1
    assert container_cpus(_fake_root(tmp_path, version, "50000")) == 1
    assert container_cpus(_fake_root(tmp_path, version, "150000")) == min(2, _usable())
    unlimited = "max" if version == 2 else "-1"
    assert container_cpus(_fake_root(tmp_path, version, unlimited)) == _usable()
    # More quota than usable CPUs: the usable CPUs bind.
    assert container_cpus(_fake_root(tmp_path, version, "6400000")) == _usable()


def test_no_cgroup_means_the_usable_cpus(tmp_path: Path) -> None:
    assert container_cpus(str(tmp_path)) == _usable()


def test_memory_per_step_caps_concurrency(tmp_path: Path, monkeypatch) -> None:
    root = _fake_root(tmp_path, 2, "6400000")
    monkeypatch.setenv("MEMSAFE_MEMORY_LIMIT", "3000MB")
    assert container_max_concurrent(root=root) == _usable()
    assert container_max_concurrent(per_step_mb=2000, root=root) == 1
    assert container_max_concurrent(per_step_mb=100000, root=root) == 1


def test_the_executor_is_dagsters_multiprocess_executor_configured(tmp_path: Path) -> None:
    executor = container_executor(max_concurrent=3, retries={"enabled": {}})
    assert isinstance(executor, dg.ExecutorDefinition)
    assert executor.name == "memsafe_container_executor"


def test_a_one_cpu_quota_runs_steps_one_at_a_time(tmp_path: Path) -> None:
    times = tmp_path / "times"
    times.mkdir()
    os.environ["MEMSAFE_TEST_CPU_ROOT"] = _fake_root(tmp_path, 2, "100000")
    os.environ["MEMSAFE_TEST_TIMES_DIR"] = str(times)
    sys.path.insert(0, str(HERE))
    try:
        import dagster_defs_executor

        with dg.instance_for_test() as instance:
            result = dg.execute_job(
                dg.reconstructable(dagster_defs_executor.sized_job), instance=instance
            )
            assert result.success
    finally:
        sys.path.remove(str(HERE))
        del os.environ["MEMSAFE_TEST_CPU_ROOT"], os.environ["MEMSAFE_TEST_TIMES_DIR"]
    spans = sorted(tuple(map(float, p.read_text().split())) for p in times.iterdir())
    assert len(spans) == 3
    for (_s1, end1), (start2, _e2) in itertools.pairwise(spans):
        assert start2 >= end1, spans  # never two at once


def test_the_readme_example_of_many_steps_and_pods_loads_and_runs() -> None:
    text = (HERE.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("## Running many steps and pods", 1)[1].split("\n## ", 1)[0]
    [code] = [b for b in section.split("```python\n")[1:]]
    namespace: dict = {"__name__": "readme_many_steps"}
    exec(code.split("```", 1)[0], namespace)
    defs: dg.Definitions = namespace["defs"]
    dg.Definitions.validate_loadable(defs)
    assert defs.resolve_job_def("big_job").executor_def.name == "memsafe_container_executor"
    result = dg.materialize([namespace["big_join"]], resources=defs.resources)
    meta = result.asset_materializations_for_node("big_join")[0].metadata
    assert meta["memsafe/admission_source"].value == "metadata"
