"""The Iceberg acceptance run under a real memory cap: a 2M-row Iceberg table (10 data files
written by pyiceberg, random int64 keys) upserted with a 200k-row source (half updates spread
over every file, half new) inside a 512 MB cgroup with a 384 MB process budget completes as
one snapshot with a kernel peak RSS under the budget, and a full scan equals the oracle.
(pyiceberg's own ``upsert`` of the same data is OOM-killed under this cap.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from iceberg_helpers import catalog_properties, child_env, load_catalog_from, merge_argv
from merge_helpers import data_files, generate_upsert_data

from memsafe_dagster.memory.cgroup_cap import run_capped

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cgroup_caps")]

BUDGET = {
    "merge_max_process_memory_mb": 384,
    "merge_max_memory_mb": 256,
    # A 512 MB container never has 512 MB "available" (the library default floor).
    "merge_min_system_available_mb": 64,
}


def test_2m_iceberg_upsert_inside_a_512mb_cgroup_stays_under_384mb(tmp_path: Path) -> None:
    root = tmp_path / "data"
    manifest = generate_upsert_data(root, 2_000_000, 10, 200_000)
    props = catalog_properties(tmp_path / "cat")
    catalog = load_catalog_from(props)
    catalog.create_namespace("ns")
    target_files = data_files(root / "target")
    table = catalog.create_table("ns.t", schema=pq.read_schema(target_files[0]))
    for path in target_files:
        table.append(pq.read_table(path).cast(table.schema().as_arrow()))
    parent = table.current_snapshot().snapshot_id

    run = run_capped(
        merge_argv(props, "ns.t", root / "source", "upsert", ["id"], **BUDGET),
        "512m",
        timeout_s=300,
        env=child_env(),
    )
    assert not run.oom_killed, run.stderr[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(
        f"2M/200k Iceberg upsert under a 512 MB cap: {run.wall_s:.2f} s wall, kernel peak RSS "
        f"{run.peak_rss_mb:.0f} MB (cgroup peak {(run.cgroup_peak_bytes or 0) / 2**20:.0f} "
        f"MB), engine phases {result['phases_s']}"
    )
    assert run.peak_rss_mb <= 384, f"peak RSS {run.peak_rss_mb:.0f} MB > 384 MB"
    assert result["updated"] == manifest["updates"] == 100_000
    assert result["inserted"] == 100_000
    assert result["target_count_after"] == manifest["expected_rows"] == 2_100_000
    assert result["files_rewritten"] == 10
    assert result["max_pressure"] != "emergency"

    table.refresh()
    snapshot = table.current_snapshot()
    assert snapshot.snapshot_id == result["snapshot_id"]
    assert snapshot.parent_snapshot_id == parent, "one snapshot for the whole merge"
    assert snapshot.summary.additional_properties["total-records"] == "2100000"
    # The oracle: target rows whose key is not in the source, plus every source row.
    source = pq.read_table(root / "source")
    target = pa.concat_tables(pq.read_table(p) for p in target_files)
    kept = target.filter(pc.invert(pc.is_in(target["id"], value_set=source["id"])))
    expected = pa.concat_tables([kept, source]).sort_by("id")
    del target, kept
    got = table.scan().to_arrow().sort_by("id").cast(expected.schema)
    assert got.num_rows == expected.num_rows == 2_100_000
    assert got.equals(expected)
