"""Peak memory of a streaming asset through the IO manager depends on the chunk, not the rows:
10M rows peak within 20 % of 1M rows (one child process per run, OS figures).

The figure compared is the child's own VmHWM (/proc/self/status at exit): ``run_measured``'s
wait4 ``ru_maxrss`` also counts the parent's RSS copied in by fork (Linux records the pre-exec
address space's high-water mark), so after other tests have grown the pytest process it reports
that process's size instead of the child's. Both are printed; the wait4 figure is only an upper
bound here.
"""

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
    peak = metadata["vm_hwm_mb"]
    assert 50 < peak <= run.peak_rss_mb + 1  # wait4's figure bounds it from above
    print(f"{mode} {rows:>10,} rows: VmHWM {peak:.1f} MB (wait4 ru_maxrss {run.peak_rss_mb:.1f})")
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
