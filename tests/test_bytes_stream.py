"""Streaming memory does not grow with the dataset, however slow the consumer: the seed's loop
(``process_in_chunks(ds.dataset(path), chunk_size_rows=50_000)`` with a ``chunk.filter`` per
chunk) over 2M and 16M rows, on an idle machine and under a 0.3-core CPU quota (a real cgroup
cpu controller: v1 ``cpu.cfs_quota_us``, v2 ``cpu.max``), peaks within 15 % of each other.

Peaks are the kernel's high-water mark of the child process (VmHWM, also sampled from outside
by ``run_measured``). The control is the same loop over a dataset scanner with PyArrow's
readahead bounded (2 batches x 2 files, what the library used before): under the quota its peak
grows with the dataset, which is what this test would catch.
"""

import contextlib
import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from memsafe_dagster.memory.cgroup_cap import run_measured

HELPER = Path(__file__).resolve().parent / "bytes_helpers.py"
REPO = HELPER.parent.parent
QUOTA = 0.3
SIZES = (2_000_000, 16_000_000)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


@contextlib.contextmanager
def cpu_quota(cores: float) -> Iterator[str]:
    """A child cgroup whose processes get ``cores`` of CPU time (cgroup v1 or v2)."""
    v1 = Path("/sys/fs/cgroup/cpu")
    own = ""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _hid, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(",") or (controllers == "" and not v1.exists()):
                own = path
                break
    except OSError:
        pass
    if v1.is_dir() and (v1 / "cpu.cfs_quota_us").exists():
        group = v1 / own.lstrip("/") / f"memsafe-cpu-{uuid.uuid4().hex[:8]}"
        files = {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": str(int(cores * 100_000))}
    else:
        group = Path("/sys/fs/cgroup") / own.lstrip("/") / f"memsafe-cpu-{uuid.uuid4().hex[:8]}"
        files = {"cpu.max": f"{int(cores * 100_000)} 100000"}
    try:
        group.mkdir()
        for name, value in files.items():
            (group / name).write_text(value)
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        pytest.skip(f"REAL CPU QUOTA UNAVAILABLE, claim not verified here: {group}: {exc}")
    try:
        yield str(group)
    finally:
        for _ in range(100):
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                import time

                time.sleep(0.05)


@pytest.fixture(scope="session")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("bytes-narrow")
    out = {}
    for rows in SIZES:
        path = root / f"rows-{rows}"
        run = run_measured(
            [sys.executable, str(HELPER), "gen-narrow", str(path), str(rows)],
            env=_child_env(),
            timeout_s=120,
        )
        assert run.returncode == 0, run.stderr
        out[rows] = path
    return out


def seed_loop(path: Path, mode: str, cgroup: str) -> float:
    run = run_measured(
        [sys.executable, str(HELPER), "seed-loop", str(path), mode, cgroup],
        env=_child_env(),
        timeout_s=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    rows = int(path.name.split("-")[1])
    assert out["rows"] == rows and out["kept"] == rows // 4
    if mode == "stream":
        assert out["largest"] == 50_000
    # The outside sampler never sees more than the child's own high-water mark (+ teardown).
    assert 40 < run.peak_rss_mb <= out["vm_hwm_mb"] + 8
    return out["vm_hwm_mb"]


def test_seed_loop_peaks_flat_from_2m_to_16m_rows_idle_and_under_a_cpu_quota(narrow) -> None:
    peaks = {}
    for rows, path in narrow.items():
        peaks[("idle", rows)] = seed_loop(path, "stream", "-")
    with cpu_quota(QUOTA) as group:
        for rows, path in narrow.items():
            peaks[("quota", rows)] = seed_loop(path, "stream", group)
    print(
        "\nseed loop peak RSS (MB): "
        + ", ".join(f"{k[0]} {k[1]:,}: {v:.0f}" for k, v in peaks.items())
    )
    assert max(peaks.values()) <= 1.15 * min(peaks.values()), peaks


def test_control_a_scanner_under_the_quota_grows_with_the_dataset(narrow) -> None:
    """What the test above detects: a scanner decodes ahead of a consumer held back by the
    quota, so its peak grows with the dataset even with readahead bounded."""
    with cpu_quota(QUOTA) as group:
        small = seed_loop(narrow[2_000_000], "scanner", group)
        large = seed_loop(narrow[16_000_000], "scanner", group)
    print(f"\nscanner under a {QUOTA}-core quota: 2M {small:.0f} MB, 16M {large:.0f} MB")
    assert large > 1.15 * small, (small, large)
