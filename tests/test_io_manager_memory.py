"""Peak memory of a streaming asset through the IO manager depends on the chunk, not the rows:
10M rows peak within 20 % of 1M rows (one child process per run; OS figures from
``run_measured``, the child's kernel RSS high-water mark, cross-checked against the VmHWM the
child reads itself at exit)."""

import json
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from memsafe_dagster.memory.cgroup_cap import run_measured

CHILD = Path(__file__).resolve().parent / "dagster_defs_big_stream.py"


def measure(rows: int, base: Path, mode: str = "stream") -> tuple[float, dict]:
    """(peak RSS of the child in MB, its materialization metadata)."""
    run = run_measured([sys.executable, str(CHILD), str(rows), str(base), mode], timeout_s=280)
    assert run.returncode == 0, run.stderr[-4000:]
    metadata = json.loads(run.stdout.strip().splitlines()[-1])
    assert metadata["dagster/row_count"] == rows
    assert ds.dataset(str(base / "big"), format="parquet").count_rows() == rows
    peak = run.peak_rss_mb
    # Polled every 5 ms, never above the child's own final high-water mark, and close to it.
    assert 0.9 * metadata["vm_hwm_mb"] <= peak <= metadata["vm_hwm_mb"] + 8  # teardown slack
    print(
        f"{mode} {rows:>10,} rows: peak RSS {peak:.1f} MB (child's VmHWM at exit "
        f"{metadata['vm_hwm_mb']:.1f} MB)"
    )
    return peak, metadata


@pytest.mark.slow
def test_streaming_10m_rows_peaks_within_20_percent_of_1m(tmp_path: Path) -> None:
    small_peak, small = measure(1_000_000, tmp_path / "1m")
    big_peak, big = measure(10_000_000, tmp_path / "10m")
    assert big["memsafe/chunks"] == 100 and small["memsafe/chunks"] == 10
    assert big_peak <= 1.2 * small_peak, (small_peak, big_peak)
    # Our own figure is the same kernel high-water mark, read during the step.
    assert big["memsafe/peak_rss_mb"] <= big_peak + 1

    # The contrast: the same 10M rows returned as one pa.Table do not fit that bound, so the
    # measurement can tell streaming from holding everything.
    table_peak, _ = measure(10_000_000, tmp_path / "10m-table", mode="table")
    assert table_peak > 1.5 * small_peak
