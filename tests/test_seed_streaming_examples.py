"""The streaming examples of docs/memory-constrained-environments.md, run from that file.

The doc keeps the seed's code except for its import lines and, in "Processing Large
Datasets", the ``Table.write_parquet(..., write_append=True)`` calls, which do not exist in
PyArrow and become our ``ChunkedParquetWriter`` (marked ``# writer``; test_docs_examples.py
checks the doc against the seed). The globals an example assumes without defining
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
from doc_examples import example, pipeline_example
from stream_helpers import WARNING, ScriptedMonitor

from memsafe_dagster.memory.cgroup_cap import run_measured

ROWS = 120_000

PROCESSING_LARGE_DATASETS = example("Processing Large Datasets")

DYNAMIC_CHUNK_SIZE = example("Dynamic Chunk Size Adjustment")

DYNAMIC_IMPORTS = """
import gc  # imports changed
from memsafe_dagster.datasets import process_in_chunks  # imports changed
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel  # imports changed
"""

PIPELINE_CLASS, PIPELINE_USAGE_FIXED = pipeline_example()
# The seed's stage 2 drops "category", which stage 3 groups by: the example cannot run as
# written, whatever the library. The doc keeps the column (marked); this is the seed's line.
PIPELINE_USAGE = PIPELINE_USAGE_FIXED.replace(
    '["id", "value", "processed_date", "category"]', '["id", "value", "processed_date"]'
)
assert PIPELINE_USAGE != PIPELINE_USAGE_FIXED


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
    # As pasted: the example brings its own imports (it used pa without importing it).
    out = run_child(textwrap.dedent(PROCESSING_LARGE_DATASETS), workdir)
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


def sums_by_category(result: pa.Table) -> dict[str, float]:
    """The pipeline example's output as ``{category: value_sum}``."""
    return dict(
        zip(
            result.column("category").to_pylist(),
            result.column("value_sum").to_pylist(),
            strict=True,
        )
    )


def test_memory_aware_pipeline_runs_with_the_seeds_stage_fixed() -> None:
    namespace = pipeline_namespace()
    exec(PIPELINE_USAGE_FIXED, namespace)
    assert sums_by_category(namespace["result"]) == expected_sums()
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
    assert sums_by_category(namespace["result"]) == expected_sums()


def test_memory_aware_pipeline_on_a_path_aggregates_all_the_data(tmp_path: Path) -> None:
    """Given a path (streamed in chunks), the seed's unmarked stages get the whole data: the
    group_by returns one row per category, not one per category and chunk."""
    namespace = pipeline_namespace()
    whole = seed_table(1_000)
    for i in range(6):
        pq.write_table(whole.slice(i * 167, 167), tmp_path / f"part-{i}.parquet")
    base = namespace["MemoryAwarePipeline"].__mro__[1]

    class OnAPath(base):
        def load_initial_data(self):
            return str(tmp_path)

    namespace["MemoryAwarePipeline"] = lambda memory_limit_mb: OnAPath(
        memory_limit_mb, chunk_size_rows=100
    )
    exec(PIPELINE_USAGE_FIXED, namespace)
    result = namespace["result"]
    assert result.num_rows == 4
    assert sums_by_category(result) == expected_sums()
