"""The acceptance run under a real memory cap: a 10M-row target (10 files, random int64 keys)
upserted with a 1M-row source (half updates) inside a 512 MB cgroup, with a 384 MB process
budget, completes correctly with a peak RSS (from the kernel) of at most 384 MB. And a cap far
too small is met with a clean MemoryPressureError, never the OOM killer.

The data is generated once per module (about 6 s, streamed: the generator never holds more
than a row group).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from merge_helpers import (
    check_upsert_result,
    child_env,
    generate_upsert_data,
    leftover_state,
    merge_argv,
    snapshot,
)

from memsafe_dagster.memory.cgroup_cap import run_capped

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cgroup_caps")]

BUDGET = {
    "merge_max_process_memory_mb": 384,
    "merge_max_memory_mb": 256,
    # A 512 MB container never has 512 MB "available" (the library default floor).
    "merge_min_system_available_mb": 64,
}


@pytest.fixture(scope="module")
def upsert_10m(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("upsert10m") / "data"
    manifest = generate_upsert_data(root, 10_000_000, 10, 1_000_000)
    return root, manifest


def test_10m_upsert_inside_a_512mb_cgroup_stays_under_384mb(upsert_10m) -> None:
    root, manifest = upsert_10m
    target = root / "target"
    run = run_capped(
        merge_argv(root / "source", target, "id", **BUDGET),
        "512m",
        timeout_s=300,
        env=child_env(),
    )
    assert not run.oom_killed, run.stderr[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(
        f"10M/1M upsert under a 512 MB cap: {run.wall_s:.2f}s wall, peak RSS "
        f"{run.peak_rss_mb:.0f} MB (kernel), engine phases {result['phases_s']}"
    )
    assert run.peak_rss_mb <= 384, f"peak RSS {run.peak_rss_mb:.0f} MB > 384 MB"
    assert result["updated"] == manifest["updates"] == 500_000
    assert result["inserted"] == 500_000
    assert result["target_count_after"] == manifest["expected_rows"] == 10_500_000
    assert result["files_rewritten"] == 10 and result["files_untouched"] == 0
    assert result["max_pressure"] != "emergency"
    check_upsert_result(target, manifest)
    assert leftover_state(target) == []


def test_a_cap_too_small_stops_cleanly_instead_of_being_oom_killed(upsert_10m) -> None:
    root, _manifest = upsert_10m
    target = root.parent / "small-cap-target"
    shutil.copytree(root / "target", target)
    before = snapshot(target)
    run = run_capped(
        merge_argv(
            root / "source",
            target,
            "id",
            merge_max_process_memory_mb=110,
            merge_max_memory_mb=110,
            merge_min_system_available_mb=16,
        ),
        "140m",
        timeout_s=300,
        env=child_env(),
    )
    assert not run.oom_killed, "the kernel killed the merge: the guard did not stop it first"
    # The budget cannot hold the key index and two files in flight: the guard stops the merge
    # (adapting first: one file at a time, smaller chunks) with a readable error.
    assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
    assert "MemoryPressureError: memory pressure EMERGENCY during merge phase" in run.stderr
    assert "the target is unchanged" in run.stderr
    assert snapshot(target) == before


def test_default_parameters_work_in_a_512mb_container(tmp_path: Path) -> None:
    """The default free-memory floor (512 MB) cannot hold under a 512 MB limit: it is scaled
    to the container, with a warning, instead of stopping the merge at once."""
    code = (
        "import logging, pyarrow as pa\n"
        "from memsafe_dagster.datasets import PyarrowDatasetIO\n"
        "logging.basicConfig()\n"
        "io = PyarrowDatasetIO()\n"
        "io.write_dataset(pa.table({'id': list(range(200_000)), 'v': [0] * 200_000}), 't')\n"
        "r = io.merge(pa.table({'id': list(range(100_000, 300_000)), 'v': [1] * 200_000}),"
        " 't', 'upsert', key_columns=['id'])\n"
        "print(r.inserted, r.updated, r.target_count_after)\n"
    )
    run = run_capped(
        [sys.executable, "-c", code], "512m", timeout_s=120, env=child_env(), cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["100000", "100000", "300000"]
    assert "merge_min_system_available_mb=512 cannot be kept free under a 512 MB limit" in (
        run.stderr
    )
