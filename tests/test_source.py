"""tabular_source: every accepted kind of input gives the same rows, single-pass kinds are read
once, and anything else is refused with a message naming the accepted kinds."""

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from stream_helpers import SCHEMA, table, write_files

from memsafe_dagster.datasets import ChunkStream
from memsafe_dagster.datasets.source import (
    ACCEPTED,
    NotTabularError,
    is_tabular,
    tabular_kind,
    tabular_source,
)

ROWS = 3_000
EXPECTED = table(ROWS)


def _files(tmp_path: Path) -> Path:
    return write_files(tmp_path / "data", files=3, rows_per_file=1_000, row_group_size=500)


KINDS = {
    "path": lambda d: str(_files(d)),
    "list of paths": lambda d: sorted(str(p) for p in _files(d).iterdir()),
    "dataset": lambda d: ds.dataset(str(_files(d))),
    "dataset scanned from a path": lambda d: str(_files(d)),
    "table": lambda d: EXPECTED,
    "record batch": lambda d: EXPECTED.combine_chunks().to_batches()[0],
    "reader": lambda d: pa.RecordBatchReader.from_batches(SCHEMA, EXPECTED.to_batches(400)),
    "stream": lambda d: ChunkStream.from_batches(EXPECTED, chunk_size_rows=333),
    "list of batches": lambda d: EXPECTED.to_batches(250),
    "generator of tables": lambda d: (EXPECTED.slice(i, 900) for i in range(0, ROWS, 900)),
}
SINGLE_PASS = {"reader", "stream", "list of batches", "generator of tables"}
COUNTED = {"path", "list of paths", "dataset", "dataset scanned from a path", "table"}
COUNTED |= {"record batch", "stream"}  # a table's stream knows its rows


def _open(kind: str, tmp_path: Path):
    return tabular_source(KINDS[kind](tmp_path), scan_paths=kind == "dataset scanned from a path")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_gives_the_same_rows_in_chunks_of_at_most_the_size_asked(
    tmp_path: Path, kind: str
) -> None:
    source = _open(kind, tmp_path)
    assert source.schema.equals(SCHEMA)
    assert source.rereadable is (kind not in SINGLE_PASS)
    assert source.count_rows() == (ROWS if kind in COUNTED else None)
    with source:
        chunks = list(source.chunks(700))
    assert all(0 < c.num_rows <= 700 for c in chunks)
    assert pa.concat_tables(chunks).equals(EXPECTED)


def _shrinking() -> tuple[list[int], object]:
    sizes = iter([800, 500, 500, 200])
    asked: list[int] = []

    def rows() -> int:
        asked.append(next(sizes, 300))
        return asked[-1]

    return asked, rows


@pytest.mark.parametrize("kind", ["table", "stream", "generator of tables"])
def test_the_size_is_asked_before_every_chunk(tmp_path: Path, kind: str) -> None:
    asked, rows = _shrinking()
    chunks = list(_open(kind, tmp_path).chunks(rows))
    assert pa.concat_tables(chunks).equals(EXPECTED)
    assert len(asked) == len(chunks)
    assert all(c.num_rows <= n for c, n in zip(chunks, asked, strict=True))
    if kind != "stream":  # the stream's own 333-row chunks cut some shorter
        assert [c.num_rows for c in chunks[:-1]] == asked[: len(chunks) - 1]


def test_parquet_files_are_read_by_row_groups_at_the_size_asked_per_file(tmp_path: Path) -> None:
    asked, rows = _shrinking()
    chunks = list(_open("path", tmp_path).chunks(rows))
    assert pa.concat_tables(chunks).equals(EXPECTED)
    assert asked == [800, 500, 500]  # one per file
    # 800 > the 500-row groups: chunks of 800; then 500 = a whole row group, read as one.
    assert [c.num_rows for c in chunks] == [800, 200, 500, 500, 500, 500]


def test_columns_are_projected_and_the_filter_applied(tmp_path: Path) -> None:
    import pyarrow.compute as pc

    for kind in ("table", "path", "dataset", "list of batches"):
        source = _open(kind, tmp_path)
        chunks = list(source.chunks(1_000, columns=["id"], filter=pc.field("id") < 10))
        out = pa.concat_tables(chunks)
        assert out.column_names == ["id"], kind
        assert out.column("id").to_pylist() == list(range(10)), kind


@pytest.mark.parametrize("kind", sorted(SINGLE_PASS))
def test_a_single_pass_source_refuses_a_second_read(tmp_path: Path, kind: str) -> None:
    source = _open(kind, tmp_path)
    assert pa.concat_tables(source.chunks(1_000)).equals(EXPECTED)
    with pytest.raises(RuntimeError, match="can be read only once"):
        source.chunks(1_000)


@pytest.mark.parametrize("kind", sorted(set(KINDS) - SINGLE_PASS))
def test_a_rereadable_source_reads_the_same_rows_again(tmp_path: Path, kind: str) -> None:
    source = _open(kind, tmp_path)
    first = pa.concat_tables(source.chunks(1_000))
    second = pa.concat_tables(source.chunks(600))
    assert first.equals(EXPECTED) and second.equals(EXPECTED)


def test_a_stream_already_iterated_is_refused() -> None:
    stream = ChunkStream.from_batches(EXPECTED)
    list(stream)
    with pytest.raises(ValueError, match="already iterated"):
        tabular_source(stream)


@pytest.mark.parametrize("obj", [42, None, {"id": [1]}, b"bytes", 1.5])
def test_a_non_tabular_object_is_refused_naming_the_accepted_kinds(obj: object) -> None:
    assert tabular_kind(obj) is None
    with pytest.raises(NotTabularError) as err:
        tabular_source(obj, what="merge source")
    assert str(err.value).startswith(f"merge source must be {ACCEPTED}; got ")
    # Callers catch it as either: it is the wrong type of object and a bad argument.
    assert isinstance(err.value, TypeError) and isinstance(err.value, ValueError)


def test_items_that_are_not_batches_are_refused_when_read() -> None:
    source = tabular_source([1, 2, 3])
    with pytest.raises(TypeError, match="RecordBatch or Table"):
        _ = source.schema


def test_missing_paths_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="does not exist"):
        tabular_source(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="holds no Parquet files"):
        tabular_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="is not a readable Parquet file"):
        tabular_source(str(tmp_path / "junk.parquet"))


def test_the_files_behind_a_source_are_known(tmp_path: Path) -> None:
    directory = _files(tmp_path)
    files = sorted(str(p) for p in directory.iterdir())
    assert list(tabular_source(str(directory)).files) == files
    assert sorted(tabular_source(str(directory), scan_paths=True).files) == files
    assert tabular_source(EXPECTED).files == ()


def test_is_tabular_needs_nothing_read() -> None:
    batch = EXPECTED.to_batches()[0]
    reader = pa.RecordBatchReader.from_batches(SCHEMA, [batch])
    for obj in (EXPECTED, batch, reader, ds.dataset(EXPECTED), ChunkStream.from_batches([])):
        assert is_tabular(obj), type(obj).__name__
    assert is_tabular([EXPECTED, batch]) and is_tabular(())
    generator = (t for t in [EXPECTED])
    for obj in ("some/path", generator, [1, 2], [EXPECTED, "x"], 42, {"id": [1]}):
        assert not is_tabular(obj), repr(obj)
    assert next(generator) is EXPECTED  # nothing was consumed


def test_reading_paths_as_files_never_imports_pyarrow_dataset(tmp_path: Path) -> None:
    """pyarrow.dataset loads pandas when it is installed: the merge's reads must not need it."""
    directory = _files(tmp_path)
    script = (
        "import sys\n"
        "from memsafe_dagster.datasets.source import tabular_source\n"
        f"source = tabular_source({str(directory)!r}, scan_paths=sys.argv[1] == 'scan')\n"
        "rows = sum(t.num_rows for t in source.chunks(700))\n"
        "print(rows, 'pyarrow.dataset' in sys.modules)\n"
    )
    files = subprocess.run(
        [sys.executable, "-c", script, "files"], capture_output=True, text=True, check=True
    )
    assert files.stdout.split() == [str(ROWS), "False"]
    scanned = subprocess.run(
        [sys.executable, "-c", script, "scan"], capture_output=True, text=True, check=True
    )
    assert scanned.stdout.split() == [str(ROWS), "True"]  # the control: a scan does import it


def test_a_finished_stream_lets_go_of_its_data() -> None:
    """A ChunkStream outlives its data (Dagster keeps an asset's output object): once it is
    consumed, neither it nor its source may hold the batches."""
    import gc

    import numpy as np
    import pyarrow.compute as pc

    def make() -> ChunkStream:
        # 16 MB in Arrow's pool (a NumPy array would be wrapped, not allocated there).
        big = pa.table({"v": pc.add(np.arange(2_000_000, dtype=np.int64), 1)})
        return ChunkStream.from_batches(big.to_batches(100_000), chunk_size_rows=250_000)

    gc.collect()
    before = pa.total_allocated_bytes()
    stream = make()
    assert pa.total_allocated_bytes() - before >= 15 * 2**20  # the control: held until read
    assert sum(c.num_rows for c in stream) == 2_000_000
    gc.collect()
    assert pa.total_allocated_bytes() - before < 2**20
    assert stream.consumed
