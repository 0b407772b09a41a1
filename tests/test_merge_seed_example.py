# ruff: noqa: E501  (the seed's example is kept verbatim, long lines included)
"""The seed document's "Safe Merging in Limited Memory" example, with only its imports changed.

It runs in a fresh child process (its memory budget must judge its own footprint, not the
test runner's) in a scratch directory, because it merges into the relative ``target_dataset/``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from merge_helpers import child_env, data_files, leftover_state

SAFE_MERGING_IN_LIMITED_MEMORY = '''
from memsafe_dagster.datasets import PyarrowDatasetIO  # imports changed
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel  # imports changed

def merge_safely_in_constrained_environment():
    """Demonstrate safe merge operations in memory-constrained environments."""

    # Create enhanced IO handler with memory monitoring
    io_handler = PyarrowDatasetIO()

    # Prepare source data
    import pyarrow as pa
    source_data = pa.table({
        "id": list(range(100_000)),
        "value": [f"source_value_{i}" for i in range(100_000)],
        "timestamp": [f"2024-01-{i%30+1:02d}" for i in range(100_000)]
    })

    try:
        # Perform merge with enhanced memory monitoring
        result = io_handler.merge(
            data=source_data,
            path="target_dataset/",
            strategy="upsert",
            key_columns=["id"],

            # Enhanced memory parameters for constrained environments
            merge_max_memory_mb=256,              # Conservative PyArrow limit
            merge_max_process_memory_mb=512,      # Conservative process limit
            merge_min_system_available_mb=128,    # Keep system responsive

            # Conservative processing parameters
            merge_chunk_size_rows=10_000,         # Smaller chunks
            enable_streaming_merge=True,          # Always enable streaming
            merge_progress_callback=lambda current, total: print(f"Merge progress: {current}/{total}")
        )

        print(f"✅ Merge completed:")
        print(f"   - Inserted: {result.inserted:,} rows")
        print(f"   - Updated: {result.updated:,} rows")
        print(f"   - Total processed: {result.source_count:,} rows")

    except MemoryError as e:
        print(f"❌ Merge failed due to memory constraints: {e}")
        print("Consider reducing merge_chunk_size_rows or memory limits")

# Usage
merge_safely_in_constrained_environment()
'''


def _run(cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", SAFE_MERGING_IN_LIMITED_MEMORY],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_safe_merging_in_limited_memory_runs_with_only_imports_changed(tmp_path: Path) -> None:
    first = _run(tmp_path)
    assert "✅ Merge completed:" in first, first
    assert "   - Inserted: 100,000 rows" in first
    assert "   - Updated: 0 rows" in first
    assert "   - Total processed: 100,000 rows" in first
    progress = [line for line in first.splitlines() if line.startswith("Merge progress: ")]
    assert len(progress) >= 10, "the progress callback is called throughout"
    done, total = (int(x) for x in progress[-1].removeprefix("Merge progress: ").split("/"))
    assert done == total > 0

    second = _run(tmp_path)  # the same rows again: every one is an update now
    assert "   - Inserted: 0 rows" in second and "   - Updated: 100,000 rows" in second

    files = data_files(tmp_path / "target_dataset")
    table = pq.read_table(files[0]) if len(files) == 1 else None
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    assert rows == 100_000
    schema = pq.read_schema(files[0])
    assert schema.names == ["id", "value", "timestamp"]
    if table is not None:
        assert table.column("value")[7].as_py() == "source_value_7"
    assert leftover_state(tmp_path / "target_dataset") == []
