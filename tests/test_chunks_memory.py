"""Bounded memory, measured by the OS: streaming 16M rows peaks like streaming 2M rows.

Each dataset is streamed with 50k-row chunks in a child process; its peak RSS is the kernel's
high-water mark of that process (VmHWM), read as it exits (``run_measured`` samples it too).
Both datasets share a file layout (500k-row files, 128k-row row groups), so the only
difference is their size: 4 files against 32.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memsafe_dagster.memory.cgroup_cap import run_measured

ROWS_PER_FILE = 500_000
WRITE_ROWS = 250_000
SCHEMA = pa.schema([("id", pa.int64()), ("x", pa.float32()), ("y", pa.int32())])

CHILD = """
import json, sys
import pyarrow.compute as pc
from memsafe_dagster.datasets import process_in_chunks

stream = process_in_chunks(sys.argv[1], chunk_size_rows=50_000)
rows = chunks = largest = id_sum = 0
for chunk in stream:
    rows += chunk.num_rows
    chunks += 1
    largest = max(largest, chunk.num_rows)
    id_sum += pc.sum(chunk.column("id")).as_py()
with open("/proc/self/status") as status:
    hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"rows": rows, "chunks": chunks, "largest": largest, "id_sum": id_sum,
                  "vm_hwm_mb": hwm_kb / 1024}))
"""


def generate(directory: Path, rows: int) -> Path:
    """``rows`` rows in 500k-row files, written a quarter of a file at a time."""
    directory.mkdir(parents=True)
    y = (np.arange(WRITE_ROWS, dtype=np.int32) % 1_000).astype(np.int32)
    x = np.linspace(0, 1, WRITE_ROWS, dtype=np.float32)
    for f in range(rows // ROWS_PER_FILE):
        with pq.ParquetWriter(
            directory / f"part-{f:03d}.parquet", SCHEMA, compression="none", use_dictionary=False
        ) as writer:
            for start in range(0, ROWS_PER_FILE, WRITE_ROWS):
                base = f * ROWS_PER_FILE + start
                ids = np.arange(base, base + WRITE_ROWS, dtype=np.int64)
                writer.write_table(
                    pa.table({"id": ids, "x": x, "y": y}, schema=SCHEMA), row_group_size=131_072
                )
    return directory


@pytest.fixture(scope="session")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("bounded")
    return {rows: generate(root / f"rows-{rows}", rows) for rows in (2_000_000, 16_000_000)}


def stream_in_child(path: Path) -> tuple[float, dict]:
    """The child's peak RSS: its own kernel high-water mark (VmHWM), read as it exits.

    ``run_measured`` samples the same figure every 5 ms, so its figure can only be lower.
    """
    run = run_measured([sys.executable, "-c", CHILD, str(path)], timeout_s=180)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    # The OS figure is the child's own (no parent RSS inherited at fork); interpreter teardown
    # after the self-report may add a few MB.
    assert 50 < run.peak_rss_mb <= out["vm_hwm_mb"] + 8
    return out["vm_hwm_mb"], out


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_dataset(datasets: dict[int, Path]) -> None:
    peaks = {}
    for rows, path in datasets.items():
        peak, out = stream_in_child(path)
        assert out["rows"] == rows
        assert out["chunks"] == rows // 50_000
        assert out["largest"] == 50_000
        assert out["id_sum"] == rows * (rows - 1) // 2
        peaks[rows] = peak
    small, large = peaks[2_000_000], peaks[16_000_000]
    print(f"\npeak RSS streaming 2M rows: {small:.1f} MB, 16M rows: {large:.1f} MB")
    assert abs(large - small) / small < 0.20, peaks
