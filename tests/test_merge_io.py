"""The merge through ``PyarrowDatasetIO().merge(...)``, the contract's entry point, on local
disks and ``memory://``; and sources given as paths on the target's filesystem."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from merge_helpers import (
    dict_rows_set,
    leftover_state,
    oracle,
    read_dataset,
    row_set,
    rows_of,
    without_state,
    write_files,
)

from memsafe_dagster.datasets import MergeResult, PyarrowDatasetIO
from memsafe_dagster.datasets.merge import STRATEGIES

TARGET = pa.table({"id": list(range(20)), "v": [f"t{i}" for i in range(20)]})
SOURCE = pa.table({"id": [5, 6, 30, 31], "v": ["s5", "s6", "s30", "s31"]})


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merge_through_pyarrow_dataset_io_on_local_disk(tmp_path: Path, strategy: str) -> None:
    target = tmp_path / "t"
    write_files(target, [TARGET.slice(0, 10), TARGET.slice(10)])
    result = PyarrowDatasetIO().merge(SOURCE, str(target), strategy, ["id"])
    assert isinstance(result, MergeResult)
    expected, counts = oracle(
        rows_of(TARGET, ["id", "v"]), rows_of(SOURCE, ["id", "v"]), strategy, ["id"]
    )
    assert row_set(read_dataset(target)) == dict_rows_set(expected, ["id", "v"])
    assert (result.inserted, result.updated, result.deleted) == (
        counts["inserted"],
        counts["updated"],
        counts["deleted"],
    )
    assert result.to_dict()["strategy"] == strategy


def test_merge_on_memory_urls_with_a_source_url() -> None:
    fs = fsspec.filesystem("memory")
    for i, part in enumerate([TARGET.slice(0, 10), TARGET.slice(10)]):
        with fs.open(f"/io-merge/t/part-{i}.parquet", "wb") as fh:
            pq.write_table(part, fh)
    with fs.open("/io-merge/s/part-0.parquet", "wb") as fh:
        pq.write_table(SOURCE, fh)
    try:
        io = PyarrowDatasetIO()
        result = io.merge(
            "memory://io-merge/s",
            "memory://io-merge/t",
            strategy="upsert",
            key_columns=["id"],
            merge_progress_callback=lambda d, t: None,
        )
        assert result.inserted == 2 and result.updated == 2
        table = io.dataset("memory://io-merge/t").to_table()
        assert table.num_rows == 22
        assert leftover_state("/io-merge/t", fs) == []
    finally:
        fs.rm("/io-merge", recursive=True)


def test_a_plain_source_path_is_on_the_target_filesystem() -> None:
    """PyarrowDatasetIO(filesystem=...) merges a source given as a path on that filesystem."""
    fs = fsspec.filesystem("memory")
    with fs.open("/io-plain/t/a.parquet", "wb") as fh:
        pq.write_table(TARGET, fh)
    with fs.open("/io-plain/s/a.parquet", "wb") as fh:
        pq.write_table(SOURCE, fh)
    try:
        result = PyarrowDatasetIO(filesystem=fs).merge(
            "/io-plain/s", "/io-plain/t", strategy="delete", key_columns="id"
        )
        assert result.deleted == 2
        assert result.target_count_after == 18
    finally:
        fs.rm("/io-plain", recursive=True)


def test_options_pass_through_and_are_checked(tmp_path: Path) -> None:
    target = tmp_path / "t"
    write_files(target, [TARGET])
    io = PyarrowDatasetIO()
    io.merge(SOURCE, str(target), "upsert", ["id"], row_group_size=3, compression="zstd")
    written = list(target.glob("ins-*.parquet"))
    assert written
    for path in written:
        md = pq.read_metadata(path)
        assert md.row_group(0).num_rows == 3
        assert md.row_group(0).column(0).compression == "ZSTD"
    with pytest.raises(ValueError, match="unknown merge option"):
        io.merge(SOURCE, str(target), "upsert", ["id"], row_groups=3)


def test_merge_dataset_resolves_a_url_when_no_filesystem_is_given() -> None:
    from memsafe_dagster.datasets.merge import merge_dataset

    fs = fsspec.filesystem("memory")
    try:
        first = merge_dataset(TARGET, "memory://no-fs/t", key_columns="id")
        second = merge_dataset(SOURCE, "memory://no-fs/t", key_columns="id")
        assert first.inserted == 20 and second.updated == 2 and second.inserted == 2
        # The touched file of new rows was folded into this merge's new-rows file.
        files = without_state(fs.find("/no-fs/t"))
        assert len(files) == 1 and files[0].rsplit("/", 1)[-1].startswith("ins-")
        with fs.open(files[0], "rb") as fh:
            assert pq.read_metadata(fh).num_rows == 22
    finally:
        fs.rm("/no-fs", recursive=True)
