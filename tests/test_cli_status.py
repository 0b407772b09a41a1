"""`memsafe status`, `memsafe monitor` and `memsafe run`, as a user runs them."""

import json
import os
import re
import subprocess

import pytest
from conftest import BIN

from memsafe_dagster.memory.cgroup_cap import MemoryCap, run_capped

MEMSAFE = str(BIN / "memsafe")
MiB = 1024 * 1024


def memsafe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([MEMSAFE, *args], capture_output=True, text=True, env=full_env)


def test_status_json_is_stable_and_complete() -> None:
    out = memsafe("status", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc) == {
        "limit_mb",
        "limit_source",
        "working_set_mb",
        "process_rss_mb",
        "pyarrow_allocated_mb",
        "system_available_mb",
        "pressure",
        "budgets",
        "limits",
        "psutil",
    }
    assert doc["limit_mb"] > 0 and doc["process_rss_mb"] > 0
    assert doc["pressure"] == "normal"
    assert doc["limits"]["source"] == doc["limit_source"]


def test_status_text_names_the_binding_limit_under_an_env_override() -> None:
    out = memsafe("status", env={"MEMSAFE_MEMORY_LIMIT": "3g"})
    # The level depends on what the rest of this machine's cgroup holds against a 3 GB limit;
    # the exit code must follow it (0 below CRITICAL, 3 at CRITICAL, 4 at EMERGENCY).
    level = re.search(r"^pressure\s+(\w+)", out.stdout, re.M)
    assert level, out.stdout
    expected = {"NORMAL": 0, "WARNING": 0, "CRITICAL": 3, "EMERGENCY": 4}[level.group(1)]
    assert out.returncode == expected, (out.stdout, out.stderr)
    assert re.search(
        r"^limit\s+3072\.0 MB\s+\(binding: env:MEMSAFE_MEMORY_LIMIT\)", out.stdout, re.M
    )
    assert re.search(r"^MEMSAFE_MEMORY_LIMIT\s+3072\.0 MB", out.stdout, re.M)
    # The container profile: 60 % process, 40 % PyArrow, 20 % kept free.
    assert "process 1843.0 MB, PyArrow 1228.0 MB, keep 614.0 MB free" in out.stdout


def test_status_rejects_a_malformed_env_limit_by_name() -> None:
    out = memsafe("status", env={"CONTAINER_MEMORY_LIMIT": "two gigs"})
    assert out.returncode == 2
    assert "CONTAINER_MEMORY_LIMIT" in out.stderr and "'two gigs'" in out.stderr


@pytest.mark.usefixtures("cgroup_caps")
def test_status_inside_a_real_capped_cgroup_finds_the_cap() -> None:
    result = run_capped([MEMSAFE, "status", "--json"], "300m", timeout_s=60)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    version = MemoryCap("1m").version
    assert doc["limit_source"] == f"cgroup-v{version}"
    assert doc["limits"]["limit_bytes"] == 300 * MiB
    assert doc["limits"]["cgroup_path"].split("/")[-1].startswith("memsafe-cap-")
    # What the container may still use is bounded by the cap, not by the host's 24 GiB.
    assert 0 < doc["system_available_mb"] < 300
    assert doc["working_set_mb"] > 0


@pytest.mark.usefixtures("cgroup_caps")
def test_an_env_limit_below_the_real_cap_binds_and_one_above_does_not() -> None:
    below = run_capped(
        [MEMSAFE, "status", "--json"], "300m", env={**os.environ, "MEMSAFE_MEMORY_LIMIT": "200m"}
    )
    above = run_capped(
        [MEMSAFE, "status", "--json"], "300m", env={**os.environ, "CONTAINER_MEMORY_LIMIT": "1g"}
    )
    assert json.loads(below.stdout)["limit_source"] == "env:MEMSAFE_MEMORY_LIMIT"
    assert json.loads(below.stdout)["limit_mb"] == 200
    assert json.loads(above.stdout)["limit_source"].startswith("cgroup-v")
    assert json.loads(above.stdout)["limit_mb"] == 300


def test_monitor_prints_one_timestamped_line_per_tick() -> None:
    out = memsafe("monitor", "--interval", "0.05", "--count", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    pattern = (
        r"^✅ \[\d\d:\d\d:\d\d\] (Working set|Used): [\d.]+MB of [\d.]+MB "
        r"\(\d+%, [\w:-]+\) Available: [\d.]+MB Pressure: NORMAL$"
    )
    for line in lines:
        assert re.match(pattern, line), line


@pytest.mark.parametrize("flag", ["--max-memory", "--max-process-mb"])  # new, old spelling
def test_monitor_reports_emergency_under_an_impossible_budget(flag: str) -> None:
    out = memsafe("monitor", "--interval", "0.05", "--count", "1", flag, "1")
    assert out.returncode == 0
    assert out.stdout.startswith("🚨") and "Pressure: EMERGENCY" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--interval", "0"], "--interval"), (["--count", "-1"], "--count")],
)
def test_monitor_rejects_bad_arguments(args: list[str], message: str) -> None:
    out = memsafe("monitor", *args)
    assert out.returncode == 2 and message in out.stderr


@pytest.mark.usefixtures("cgroup_caps")
def test_run_reports_an_oom_kill_under_the_cap() -> None:
    hog = "x = b'1' * (400 * 1024 * 1024)"
    out = memsafe("run", "--limit", "150m", "--", "python3", "-c", hog)
    assert out.returncode == 137
    assert "OOM-killed" in out.stderr and "under a 150 MB cap" in out.stderr
    ok = memsafe("run", "--memory", "150", "--", "python3", "-c", "print('fits')")  # old flag
    assert ok.returncode == 0 and ok.stdout.strip() == "fits"
