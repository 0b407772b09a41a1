"""An inbox merge asset driven through sequences of batches, checked against the oracle.

Each example drops several batches of Parquet files into an inbox and materializes the merge
asset after each batch (a real Dagster instance, the asset's own checks), with small files so
later batches compact and rewrite what earlier ones wrote. After every run the target holds
exactly the oracle's rows and the materialization's counts are the oracle's.

No ``from __future__ import annotations`` here: this module builds Dagster definitions.
"""

import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from dagster_helpers import latest_metadata
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from merge_helpers import data_files, oracle

from memsafe_dagster import build_merge_asset
from memsafe_dagster import metadata as md
from memsafe_dagster.datasets.merge import STRATEGIES
from memsafe_dagster.resources import MemoryMonitorResource

SCHEMA = pa.schema([("id", pa.int64()), ("v", pa.string())])

batches = st.lists(
    st.lists(st.lists(st.integers(0, 120), min_size=1, max_size=40), min_size=1, max_size=3),
    min_size=2,
    max_size=5,
)


@settings(
    max_examples=30,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    strategy=st.sampled_from(STRATEGIES),
    seed_ids=st.lists(st.integers(0, 120), unique=True, max_size=60),
    batches=batches,
    on_duplicate=st.sampled_from(["first", "last"]),
)
def test_inbox_batches_merge_like_the_oracle(
    strategy: str, seed_ids: list[int], batches: list[list[list[int]]], on_duplicate: str
) -> None:
    version = itertools.count()

    def rows(ids: list[int], tag: str) -> list[dict[str, Any]]:
        return [{"id": i, "v": f"{tag}{i}-{next(version)}"} for i in ids]

    with tempfile.TemporaryDirectory() as tmp:
        inbox, target = Path(tmp) / "inbox", Path(tmp) / "target"
        inbox.mkdir()
        expected = rows(seed_ids, "t")
        if expected:
            target.mkdir()
            pq.write_table(pa.Table.from_pylist(expected, schema=SCHEMA), target / "seed.parquet")
        asset = build_merge_asset(
            "customers",
            source=str(inbox),
            target_path=str(target),
            key_columns="id",
            strategy=strategy,
            on_duplicate_keys=on_duplicate,
            target_file_rows=16,
            row_group_size=5,
            allow_empty_source=True,
        )
        instance = dg.DagsterInstance.ephemeral()
        resources = {"memory": MemoryMonitorResource(min_system_available_mb=0)}
        for b, files in enumerate(batches):
            source: list[dict[str, Any]] = []
            for f, ids in enumerate(files):
                part = rows(ids, f"b{b}f{f}-")
                source += part  # files merge oldest first: later files win with "last"
                path = inbox / f"batch{b}-{f}.parquet"
                pq.write_table(pa.Table.from_pylist(part, schema=SCHEMA), path)
                time.sleep(0.01)  # distinct mtimes give the order
            expected_before = len(expected)
            expected, counts = oracle(expected, source, strategy, ["id"], on_duplicate)
            result = dg.materialize([asset], resources=resources, instance=instance)
            assert result.success
            tables = [pq.read_table(p) for p in data_files(target)]
            got = pa.concat_tables(tables).to_pylist() if tables else []
            assert sorted(got, key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"])
            meta = latest_metadata(instance, "customers")
            assert (meta[md.INSERTED], meta[md.UPDATED], meta[md.DELETED]) == (
                counts["inserted"],
                counts["updated"],
                counts["deleted"],
            ), (b, strategy)
            assert meta[md.ROW_COUNT] == len(expected)
            merge = meta[md.MERGE]
            assert merge["target_count_before"] == expected_before
            assert merge["source_count"] == len(source)
            assert not list(inbox.glob("*.parquet")), "merged files stay in the inbox"
