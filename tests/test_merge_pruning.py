"""Pruning by key statistics, rewrite only on a real match, and no tiny-file swarm."""

from __future__ import annotations

import io
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from merge_helpers import data_files, read_dataset, snapshot, without_state, write_files

from memsafe_dagster.datasets.merge import merge_dataset

FS = fsspec.filesystem("file")


def _clustered(target: Path, files: int = 20, rows: int = 2_000, row_group: int = 500) -> None:
    """``files`` files of even keys in disjoint ascending ranges."""
    target.mkdir(parents=True)
    for f in range(files):
        ids = pa.array(range(2 * f * rows, 2 * (f + 1) * rows, 2), pa.int64())
        table = pa.table({"id": ids, "v": pa.array([f"t{f}"] * rows)})
        pq.write_table(table, target / f"part-{f:05d}.parquet", row_group_size=row_group)


def test_a_source_within_one_of_twenty_files_rewrites_exactly_that_file(tmp_path: Path) -> None:
    target = tmp_path / "t"
    _clustered(target)
    lo = 2 * 7 * 2_000  # file 7 holds [28000, 31998]
    source = pa.table(
        {"id": pa.array([lo + 10, lo + 500, lo + 11, lo + 3001], pa.int64()), "v": ["s"] * 4}
    )
    before = snapshot(target)
    result = merge_dataset(
        source, str(target), fs=FS, key_columns=["id"], merge_min_system_available_mb=0
    )
    assert result.files_rewritten == 1
    assert result.files_removed == 1
    assert result.files_untouched == 19
    assert result.files_pruned == 19
    after = snapshot(target)
    assert "part-00007.parquet" not in after
    for name, data in before.items():
        if name != "part-00007.parquet":
            assert after[name] == data, f"{name} was touched"
    assert result.updated == 2 and result.inserted == 2
    assert read_dataset(target).num_rows == 40_002


def test_a_file_is_rewritten_only_when_it_really_holds_a_matched_key(tmp_path: Path) -> None:
    target = tmp_path / "t"
    _clustered(target)
    lo = 2 * 3 * 2_000
    # Odd keys inside file 3's range: its statistics cannot rule them out, its keys can.
    source = pa.table({"id": pa.array([lo + 1, lo + 3, lo + 999], pa.int64()), "v": ["s"] * 3})
    before = snapshot(target)
    result = merge_dataset(
        source, str(target), fs=FS, key_columns=["id"], merge_min_system_available_mb=0
    )
    assert result.files_rewritten == 0 and result.files_removed == 0
    assert result.files_pruned == 19 and result.inserted == 3
    after = snapshot(target)
    assert {k: v for k, v in after.items() if k in before} == before
    assert len(without_state(after)) == len(without_state(before)) + 1


class TracingFS(MemoryFileSystem):
    """An in-memory filesystem that records every byte range read, per path."""

    protocol = "tracemem"
    root_marker = "/"
    reads: dict[str, list[tuple[int, int]]] = {}

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode=mode, **kwargs)
        if "r" not in mode:
            return f
        return _Traced(f, self.reads.setdefault(self._strip_protocol(path), []))


class _Traced(io.RawIOBase):
    def __init__(self, inner, log: list[tuple[int, int]]) -> None:
        self.inner = inner
        self.log = log
        self.size = inner.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def read(self, n: int = -1) -> bytes:
        start = self.inner.tell()
        data = self.inner.read(n)
        self.log.append((start, start + len(data)))
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.inner.close()
        super().close()


def _column_chunk_range(md: pq.FileMetaData, rg: int, col: int) -> tuple[int, int]:
    c = md.row_group(rg).column(col)
    start = c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset
    return start, start + c.total_compressed_size


def test_pruned_files_are_read_no_further_than_their_footer() -> None:
    fs = TracingFS()
    TracingFS.reads.clear()
    target = "/pruning"
    rows, files, rg = 20_000, 6, 5_000
    for f in range(files):
        ids = pa.array(range(f * rows, (f + 1) * rows), pa.int64())
        noise = pa.array([(i * 2654435761) % 2**61 for i in range(rows)], pa.int64())
        with fs.open(f"{target}/part-{f:05d}.parquet", "wb") as fh:
            pq.write_table(
                pa.table({"id": ids, "v": noise}), fh, row_group_size=rg, compression="none"
            )
    metas = {}
    for f in range(files):
        with fs.open(f"{target}/part-{f:05d}.parquet", "rb") as fh:
            metas[f] = (pq.read_metadata(fh), fh.size)
    TracingFS.reads.clear()
    # Keys only in row group 2 of file 4 (ids 90000..94999), insert: no rewrite.
    source = pa.table({"id": pa.array([90_010, 91_000, 999_999], pa.int64()), "v": [1, 2, 3]})
    result = merge_dataset(
        source,
        target,
        fs=fs,
        strategy="insert",
        key_columns=["id"],
        merge_min_system_available_mb=0,
    )
    assert result.inserted == 1 and result.files_rewritten == 0
    assert result.files_pruned == files - 1
    assert result.row_groups_pruned == files * (rows // rg) - 1
    for f in range(files):
        md, size = metas[f]
        # PyArrow reads the last 64 KiB at once to find the footer.
        footer_start = size - max(64 * 1024, md.serialized_size + 8)
        assert footer_start > _column_chunk_range(md, 2, 0)[1], "files too small for the test"
        allowed = [(footer_start, size)]
        if f == 4:
            allowed.append(_column_chunk_range(md, 2, 0))
        for start, stop in TracingFS.reads.get(f"{target}/part-{f:05d}.parquet", []):
            assert any(a <= start and stop <= b for a, b in allowed), (f, start, stop, allowed)
    assert TracingFS.reads.get(f"{target}/part-00004.parquet"), "file 4 was never read"


def test_string_keys_prune_too(tmp_path: Path) -> None:
    target = tmp_path / "t"
    tables = [
        pa.table({"k": [f"{letter}{i:04d}" for i in range(100)], "v": list(range(100))})
        for letter in "abcdefgh"
    ]
    write_files(target, tables)
    result = merge_dataset(
        pa.table({"k": ["c0005", "c9999"], "v": [-1, -2]}),
        str(target),
        fs=FS,
        key_columns=["k"],
        merge_min_system_available_mb=0,
    )
    assert result.files_pruned == 7 and result.files_rewritten == 1
    assert result.updated == 1 and result.inserted == 1


def test_composite_keys_prune_on_each_column(tmp_path: Path) -> None:
    target = tmp_path / "t"
    tables = [
        pa.table({"day": [d] * 50, "n": list(range(50)), "v": list(range(50))}) for d in range(10)
    ]
    write_files(target, tables)
    result = merge_dataset(
        pa.table({"day": [6, 6], "n": [3, 77], "v": [-1, -2]}),
        str(target),
        fs=FS,
        key_columns=["day", "n"],
        merge_min_system_available_mb=0,
    )
    assert result.files_pruned == 9 and result.files_rewritten == 1
    assert result.updated == 1 and result.inserted == 1


def test_many_small_merges_do_not_leave_a_swarm_of_tiny_files(tmp_path: Path) -> None:
    target = tmp_path / "t"
    write_files(target, [pa.table({"id": pa.array(range(1_000), pa.int64()), "v": [0] * 1_000})])
    for m in range(30):
        ids = pa.array(range(10_000 + m * 10, 10_000 + (m + 1) * 10), pa.int64())
        merge_dataset(
            pa.table({"id": ids, "v": [m + 1] * 10}),
            str(target),
            fs=FS,
            key_columns=["id"],
            target_file_rows=100,
            merge_min_system_available_mb=0,
        )
    files = data_files(target)
    assert len(files) <= 5, [f.name for f in files]
    out = read_dataset(target)
    assert out.num_rows == 1_300
    assert sorted(out.column("id").to_pylist()) == [*range(1_000), *range(10_000, 10_300)]
    ins = [pq.read_metadata(f).num_rows for f in files if f.name.startswith("ins-")]
    assert sum(1 for n in ins if n < 100) <= 1, ins


@pytest.mark.parametrize("layout", ["sorted", "random"])
def test_rewritten_survivors_keep_their_own_file_when_large(tmp_path: Path, layout: str) -> None:
    target = tmp_path / "t"
    ids = list(range(0, 4_000))
    if layout == "random":
        ids = ids[::-1]
    write_files(
        target,
        [
            pa.table({"id": ids[:2_000], "v": [0] * 2_000}),
            pa.table({"id": ids[2_000:], "v": [1] * 2_000}),
        ],
    )
    result = merge_dataset(
        pa.table({"id": [ids[5], ids[2_500]], "v": [9, 9]}),
        str(target),
        fs=FS,
        key_columns=["id"],
        target_file_rows=1_000,
        merge_min_system_available_mb=0,
    )
    names = sorted(p.name for p in data_files(target))
    assert result.files_rewritten == 2
    assert sum(n.startswith("part-2") for n in names) == 2, names  # one output per input
    assert sum(n.startswith("ins-") for n in names) == 1
    assert read_dataset(target).num_rows == 4_000
