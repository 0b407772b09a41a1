"""The seed document's streaming examples, run against memsafe-dagster.

Each example's code is kept verbatim except for its import lines (marked ``# imports
changed``) and, in "Processing Large Datasets", the ``Table.write_parquet(...,
write_append=True)`` calls, which do not exist in PyArrow and become our
``ChunkedParquetWriter`` (marked ``# writer``). The globals an example assumes without defining
(``large_dataset``, ``process_chunk``, the pipeline's initial data) are supplied around it.
Examples that judge real memory run in a fresh child process, so the pytest process's own
footprint cannot tip their budgets.
"""

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stream_helpers import WARNING, ScriptedMonitor

from memsafe_dagster.memory.cgroup_cap import run_measured

ROWS = 120_000

PROCESSING_LARGE_DATASETS = '''
import gc
from memsafe_dagster.datasets import process_in_chunks, ChunkedParquetWriter  # imports changed
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel  # imports changed

def process_large_dataset_safely(dataset_path, output_path):
    """Process large dataset with memory monitoring and graceful degradation."""

    # Configure conservative memory limits for constrained environments
    memory_monitor = MemoryMonitor(
        max_pyarrow_mb=512,      # Reduced from default 2048MB
        max_process_memory_mb=1024, # 1GB total process limit
        min_system_available_mb=256, # Keep 256MB free
    )

    # Import dataset
    import pyarrow.dataset as ds
    dataset = ds.dataset(dataset_path)

    chunks_processed = 0
    total_rows = dataset.count_rows()

    print(f"Processing {total_rows:,} rows with memory monitoring...")

    try:
        for chunk in process_in_chunks(
            dataset=dataset,
            chunk_size_rows=50_000,  # Smaller chunks for memory-constrained environments
            max_memory_mb=512,
            memory_monitor=memory_monitor,
            enable_progress=True
        ):
            chunks_processed += 1

            # Memory-aware processing
            if chunks_processed % 10 == 0:  # Check every 10 chunks
                pressure = memory_monitor.check_memory_pressure()

                if pressure == MemoryPressureLevel.WARNING:
                    print(f"⚠️  Memory warning at chunk {chunks_processed}")
                    gc.collect()  # Trigger garbage collection

                elif pressure == MemoryPressureLevel.CRITICAL:
                    print(f"🔥 Memory critical at chunk {chunks_processed}, reducing chunk size")
                    # Could implement dynamic chunk size reduction here
                    gc.collect()

                elif pressure == MemoryPressureLevel.EMERGENCY:
                    raise MemoryError("Memory limit exceeded, cannot continue safely")

            # Process chunk (example: filter and write)
            processed_chunk = chunk.filter(pa.compute.field("status") == "active")

            if chunks_processed == 1:
                # Write first chunk with schema
                writer = ChunkedParquetWriter(  # writer
                    output_path,
                    compression='snappy'
                )
                writer.write(processed_chunk)  # writer
            else:
                # Append subsequent chunks
                writer.write(processed_chunk)  # writer

            # Progress reporting
            rows_processed = chunks_processed * 50_000
            progress = min(rows_processed / total_rows * 100, 100)
            print(f"Progress: {progress:.1f}% ({rows_processed:,}/{total_rows:,} rows)")
        writer.close()  # writer: publish the file

    except MemoryError as e:
        print(f"❌ Memory error: {e}")
        print(f"Processed {chunks_processed} chunks before failure")
        raise

    print(f"✅ Completed processing {chunks_processed} chunks successfully")

# Usage
process_large_dataset_safely(
    dataset_path="large_dataset.parquet",
    output_path="filtered_output.parquet"
)
'''

DYNAMIC_CHUNK_SIZE = '''
def adaptive_chunked_processing(dataset, initial_chunk_size=100_000):
    """Process dataset with adaptive chunk sizing based on memory pressure."""

    monitor = MemoryMonitor(max_pyarrow_mb=512)
    chunk_size = initial_chunk_size
    chunks_processed = 0

    for chunk in process_in_chunks(
        dataset=dataset,
        chunk_size_rows=chunk_size,
        max_memory_mb=512,
        memory_monitor=monitor
    ):
        chunks_processed += 1

        # Monitor memory pressure
        if chunks_processed > 1:  # Don't adjust on first chunk
            pressure = monitor.check_memory_pressure()

            if pressure == MemoryPressureLevel.WARNING:
                # Reduce chunk size by 20%
                chunk_size = int(chunk_size * 0.8)
                print(f"⚠️  Reducing chunk size to {chunk_size:,} due to memory pressure")

            elif pressure == MemoryPressureLevel.CRITICAL:
                # Reduce chunk size by 50%
                chunk_size = int(chunk_size * 0.5)
                print(f"🔥 Aggressively reducing chunk size to {chunk_size:,}")
                gc.collect()

            elif pressure == MemoryPressureLevel.EMERGENCY:
                raise MemoryError("Cannot continue safely with current memory constraints")

        # Process the chunk
        yield chunk

# Usage
for chunk in adaptive_chunked_processing(large_dataset):
    process_chunk(chunk)
'''

DYNAMIC_IMPORTS = """
import gc  # imports changed
from memsafe_dagster.datasets import process_in_chunks  # imports changed
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel  # imports changed
"""

PIPELINE_CLASS = '''
class MemoryAwarePipeline:
    """Example pipeline that adapts to memory constraints."""

    def __init__(self, memory_limit_mb=1024):
        self.monitor = MemoryMonitor(max_pyarrow_mb=memory_limit_mb)
        self.gc_threshold = 0.8  # Trigger GC at 80% of limit

    def process_pipeline(self, stages):
        """Process data through pipeline stages with memory monitoring."""

        data = self.load_initial_data()

        for i, stage in enumerate(stages):
            print(f"Processing stage {i+1}/{len(stages)}: {stage.__name__}")

            # Check memory before stage
            pressure = self.monitor.check_memory_pressure()

            if pressure.value in ['warning', 'critical']:
                print(f"Memory pressure before stage: {pressure.value}")

                if pressure == MemoryPressureLevel.CRITICAL:
                    print("Triggering garbage collection")
                    gc.collect()

                    # Recheck pressure
                    pressure = self.monitor.check_memory_pressure()
                    if pressure == MemoryPressureLevel.EMERGENCY:
                        raise MemoryError("Cannot continue pipeline")

            # Process stage
            data = stage(data)

            # Force memory check after stage
            final_pressure = self.monitor.check_memory_pressure()
            if final_pressure == MemoryPressureLevel.EMERGENCY:
                raise MemoryError(f"Pipeline stage {stage.__name__} exceeded memory limits")

        return data
'''

PIPELINE_USAGE = """
# Usage example
pipeline = MemoryAwarePipeline(memory_limit_mb=512)

def stage1_filter(data):
    return data.filter(pa.compute.field("status") == "active")

def stage2_transform(data):
    return data.select(["id", "value", "processed_date"])

def stage3_aggregate(data):
    return data.group_by("category").aggregate([("value", "sum")])

result = pipeline.process_pipeline([stage1_filter, stage2_transform, stage3_aggregate])
"""

# The seed's stage 2 drops "category", which stage 3 groups by: the example cannot run as
# written, whatever the library. This is the one-word fix that lets it run.
PIPELINE_USAGE_FIXED = PIPELINE_USAGE.replace(
    '["id", "value", "processed_date"]', '["id", "value", "processed_date", "category"]'
)


def seed_table(rows: int) -> pa.Table:
    ids = np.arange(rows, dtype=np.int64)
    return pa.table(
        {
            "id": ids,
            "value": (ids % 100).astype(np.float64),
            "processed_date": pa.array([f"2024-01-{i % 28 + 1:02d}" for i in range(rows)]),
            "category": pa.array(["a", "b", "c", "d"])
            .take(pa.array(ids % 4))
            .dictionary_encode()
            .dictionary_decode(),
            "status": np.where(ids % 3 == 0, "active", "inactive"),
        }
    )


def run_child(code: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    run = run_measured([sys.executable, "-c", code], cwd=cwd, env=env, timeout_s=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    pq.write_table(seed_table(ROWS), tmp_path / "large_dataset.parquet", row_group_size=30_000)
    return tmp_path


def test_processing_large_datasets(workdir: Path) -> None:
    code = "import pyarrow as pa\n" + textwrap.dedent(PROCESSING_LARGE_DATASETS)
    out = run_child(code, workdir)
    assert "Processing 120,000 rows with memory monitoring..." in out
    assert "Progress: 100.0%" in out
    assert "✅ Completed processing 3 chunks successfully" in out
    written = pq.read_table(workdir / "filtered_output.parquet")
    assert written.num_rows == ROWS // 3
    assert set(written.column("status").to_pylist()) == {"active"}
    assert written.column("id").to_pylist() == list(range(0, ROWS, 3))
    meta = pq.ParquetFile(workdir / "filtered_output.parquet").metadata
    assert meta.num_row_groups == 3
    assert meta.row_group(0).column(0).compression == "SNAPPY"
    assert sorted(p.name for p in workdir.iterdir()) == [
        "filtered_output.parquet",
        "large_dataset.parquet",
    ]


def test_dynamic_chunk_size_adjustment_with_a_real_monitor(workdir: Path) -> None:
    supplied = """
large_dataset = "large_dataset.parquet"
seen = []
def process_chunk(chunk):
    seen.append(chunk.num_rows)
"""
    report = "\nimport json\nprint(json.dumps({'sizes': seen}))\n"
    out = run_child(DYNAMIC_IMPORTS + supplied + DYNAMIC_CHUNK_SIZE + report, workdir)
    sizes = json.loads(out.strip().splitlines()[-1])["sizes"]
    assert sum(sizes) == ROWS
    assert max(sizes) <= 100_000


def test_dynamic_chunk_size_adjustment_reaches_the_stream() -> None:
    """Under WARNING the seed shrinks a local variable the running generator never sees;
    our stream shrinks its chunks itself, so the example degrades as its text promises."""

    class AlwaysWarning(ScriptedMonitor):
        def __init__(self, **kwargs: object) -> None:
            super().__init__([WARNING], **kwargs)

    seen: list[int] = []
    rows = 400_000
    namespace = {"large_dataset": seed_table(rows), "process_chunk": lambda c: seen.append(c)}
    exec(DYNAMIC_IMPORTS, namespace)
    namespace["MemoryMonitor"] = AlwaysWarning  # the controllable pressure source
    exec(DYNAMIC_CHUNK_SIZE, namespace)
    sizes = [c.num_rows for c in seen]
    assert sum(sizes) == rows
    assert sizes[:5] == [80_000, 64_000, 51_200, 40_960, 32_768]
    assert pa.concat_tables(seen).column("id").to_pylist() == list(range(rows))


def pipeline_namespace() -> dict:
    namespace: dict = {}
    exec("import pyarrow as pa\nfrom memsafe_dagster import MemoryAwarePipeline", namespace)
    base = namespace["MemoryAwarePipeline"]
    data = seed_table(1_000)

    class MemoryAwarePipeline(base):  # supplies the initial data the example assumes
        def load_initial_data(self):
            return data

    namespace["MemoryAwarePipeline"] = MemoryAwarePipeline
    return namespace


def expected_sums() -> dict[str, float]:
    t = seed_table(1_000)
    sums: dict[str, float] = {}
    for row in t.to_pylist():
        if row["status"] == "active":
            sums[row["category"]] = sums.get(row["category"], 0.0) + row["value"]
    return sums


def test_memory_aware_pipeline_runs_with_the_seeds_stage_fixed() -> None:
    namespace = pipeline_namespace()
    exec(PIPELINE_USAGE_FIXED, namespace)
    result = namespace["result"]
    got = dict(
        zip(
            result.column("category").to_pylist(),
            result.column("value_sum").to_pylist(),
            strict=True,
        )
    )
    assert got == expected_sums()
    reports = namespace["pipeline"].stage_reports
    assert [r.name for r in reports] == ["stage1_filter", "stage2_transform", "stage3_aggregate"]
    assert reports[0].rows_in == 1_000 and reports[0].rows_out == 334


def test_memory_aware_pipeline_verbatim_points_at_the_seeds_broken_stage() -> None:
    namespace = pipeline_namespace()
    with pytest.raises(pa.ArrowInvalid, match="category") as info:
        exec(PIPELINE_USAGE, namespace)
    assert "in MemoryAwarePipeline stage 3/3 'stage3_aggregate'" in info.value.__notes__
    assert [r.name for r in namespace["pipeline"].stage_reports][-1] == "stage3_aggregate"


def test_the_seeds_own_pipeline_class_runs_on_our_monitor() -> None:
    namespace: dict = {}
    exec(
        "import gc\nimport pyarrow as pa\n"
        "from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel",  # imports changed
        namespace,
    )
    exec(PIPELINE_CLASS, namespace)
    data = seed_table(1_000)
    namespace["MemoryAwarePipeline"].load_initial_data = lambda self: data  # assumed by the seed
    exec(PIPELINE_USAGE_FIXED, namespace)
    result = namespace["result"]
    got = dict(
        zip(
            result.column("category").to_pylist(),
            result.column("value_sum").to_pylist(),
            strict=True,
        )
    )
    assert got == expected_sums()
