"""Inbox file selection, Dagster-free: which files a run merges, and as what dataset."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memsafe_dagster.datasets.inbox import (
    PROCESSED_DIR,
    archive,
    batch_dataset,
    batch_key,
    inbox_member,
    list_inbox,
    select_batch,
)

FS = fsspec.filesystem("file")


def drop(inbox: Path, name: str, table: pa.Table, mtime: float) -> Path:
    path = inbox / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    os.utime(path, (mtime, mtime))
    return path


def ids(*values: int) -> pa.Table:
    return pa.table({"id": pa.array(values, pa.int64())})


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    root = tmp_path / "inbox"
    drop(root, "b.parquet", ids(2), mtime=1_000)
    drop(root, "a.parquet", ids(1), mtime=2_000)
    drop(root, "sub/c.parquet", ids(3), mtime=3_000)
    drop(root, ".d.parquet.tmp", ids(4), mtime=500)  # a writer still uploading
    (root / "notes.txt").write_text("not parquet")
    return root


def test_without_a_request_every_matching_file_is_taken_oldest_first(inbox: Path) -> None:
    batch = select_batch(FS, str(inbox), "*.parquet", [])
    assert [f.name for f in batch] == ["b.parquet", "a.parquet"]
    assert [f.name for f in select_batch(FS, str(inbox), "**/*.parquet", [])] == [
        "b.parquet",
        "a.parquet",
        "c.parquet",
    ]
    assert batch == list_inbox(FS, str(inbox), "*.parquet")


def test_requested_files_by_name_path_or_url_oldest_first(inbox: Path) -> None:
    requested = ["sub/c.parquet", f"file://{inbox}/a.parquet", str(inbox / "b.parquet")]
    batch = select_batch(FS, str(inbox) + "/", "*.parquet", requested)
    assert [f.name for f in batch] == ["b.parquet", "a.parquet", "c.parquet"]
    assert [f.mtime for f in batch] == [1_000, 2_000, 3_000]


def test_a_file_already_archived_is_skipped_and_said_so(inbox: Path) -> None:
    first = select_batch(FS, str(inbox), "*.parquet", ["a.parquet", "b.parquet"])
    archived = archive(FS, str(inbox), first[:1], batch_key(first))
    assert archived == [str(inbox / PROCESSED_DIR / batch_key(first) / "b.parquet")]
    said: list[str] = []
    again = select_batch(FS, str(inbox), "*.parquet", ["a.parquet", "b.parquet"], log=said.append)
    assert [f.name for f in again] == ["a.parquet"]
    assert said == [f"memsafe: b.parquet was already merged (now {archived[0]})"]
    # Listings skip the archive.
    assert [f.name for f in select_batch(FS, str(inbox), "**/*.parquet", [])] == [
        "a.parquet",
        "c.parquet",
    ]


def test_a_missing_file_is_an_error(inbox: Path) -> None:
    with pytest.raises(ValueError, match=r"inbox file 'gone.parquet' not found in"):
        select_batch(FS, str(inbox), "*.parquet", ["a.parquet", "gone.parquet"])


@pytest.mark.parametrize(
    "raw", ["", "../outside.parquet", "/elsewhere/a.parquet", "_processed/x/a.parquet", ".d"]
)
def test_only_visible_files_inside_the_inbox_can_be_requested(inbox: Path, raw: str) -> None:
    with pytest.raises(ValueError, match="files: "):
        inbox_member(FS, str(inbox), raw)


def test_the_batch_is_one_dataset_with_the_files_unified_schema(inbox: Path) -> None:
    drop(inbox, "wide.parquet", pa.table({"id": [5], "extra": ["x"]}), mtime=4_000)
    batch = select_batch(FS, str(inbox), "*.parquet", [])
    dataset = batch_dataset(FS, batch)
    assert dataset.schema.names == ["id", "extra"]
    table = dataset.to_table()
    assert table["id"].to_pylist() == [2, 1, 5]  # batch order: oldest first
    assert table["extra"].to_pylist() == [None, None, "x"]


def test_incompatible_files_are_named(inbox: Path) -> None:
    drop(inbox, "text.parquet", pa.table({"id": ["not a number"]}), mtime=4_000)
    batch = select_batch(FS, str(inbox), "*.parquet", [])
    with pytest.raises(ValueError, match=r"text\.parquet have incompatible schemas"):
        batch_dataset(FS, batch)
