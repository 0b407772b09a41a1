"""OutputSink, the Parquet sink of the writer and the merge: exact row groups and rolling files
whatever the incoming chunk sizes, the same files in background mode, nothing left on abort."""

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from stream_helpers import SCHEMA, table

from memsafe_dagster.datasets.sink import OutputSink, SettingsProvider

IRREGULAR = [1, 999, 7, 3_000, 13, 1_480, 500, 4_000]  # 10,000 rows
LOCAL = pafs.LocalFileSystem()


def pieces(t: pa.Table, sizes: list[int]) -> list[pa.Table]:
    out, start = [], 0
    for n in sizes:
        out.append(t.slice(start, n))
        start += n
    return out


def factory(directory: Path):
    """A path factory like the merge's: ``<directory>/<prefix>-NNNNN.parquet``."""
    names = iter(range(1 << 20))

    def new_file(sub: str, prefix: str) -> str:
        return str(directory / sub / f"{prefix}-{next(names):05d}.parquet")

    return new_file


def sink(directory: Path, **kwargs) -> OutputSink:
    settings = SettingsProvider(
        SCHEMA,
        row_group_size=kwargs.pop("row_group_size", 1_000),
        compression="zstd",
        use_dictionary=kwargs.pop("use_dictionary", True),
    )
    return OutputSink(LOCAL, settings, factory(directory), **kwargs)


def row_groups(path: str) -> list[int]:
    md = pq.read_metadata(path)
    return [md.row_group(i).num_rows for i in range(md.num_row_groups)]


def test_row_groups_are_exact_and_files_roll_whatever_the_chunk_sizes(tmp_path: Path) -> None:
    data = table(10_000)
    out = sink(tmp_path, prefix="ins", max_rows=2_600)
    for piece in pieces(data, IRREGULAR):
        out.write(piece)
    assert out.rows == 10_000
    files = out.close()
    assert [f.rows for f in files] == [2_600, 2_600, 2_600, 2_200]
    # Each file: full row groups, then what is left before the roll.
    assert [row_groups(f.staged) for f in files] == [[1_000, 1_000, 600]] * 3 + [
        [1_000, 1_000, 200]
    ]
    assert [f.row_groups for f in files] == [3, 3, 3, 3]
    assert all(f.bytes == Path(f.staged).stat().st_size for f in files)
    assert all(Path(f.staged).name.startswith("ins-") for f in files)
    assert pa.concat_tables(pq.read_table(f.staged) for f in files).equals(data)
    assert out.close() == files  # closing again is harmless


def test_without_a_row_group_size_each_write_is_a_row_group(tmp_path: Path) -> None:
    out = sink(tmp_path, row_group_size=None, max_rows=4_000)
    for piece in pieces(table(10_000), IRREGULAR):
        out.write(piece)
    files = out.close()
    assert [row_groups(f.staged) for f in files] == [
        [1, 999, 7, 2_993],
        [7, 13, 1_480, 500, 2_000],
        [2_000],
    ]


def test_nothing_is_created_before_the_first_row(tmp_path: Path) -> None:
    out = sink(tmp_path / "out")
    out.write(SCHEMA.empty_table())
    assert out.close() == [] and not (tmp_path / "out").exists()
    empty = sink(tmp_path / "out")
    [written] = empty.close(ensure_file=True)
    assert written.rows == 0 and pq.read_schema(written.staged).equals(SCHEMA)


def test_background_encoding_writes_the_same_files(tmp_path: Path) -> None:
    data = table(10_000)
    written = {}
    for mode in (False, True):
        out = sink(tmp_path / str(mode), max_rows=3_000, background=mode)
        for piece in pieces(data, IRREGULAR):
            out.write(piece)
        if mode:
            assert any(t.name == "memsafe-merge-writer" for t in threading.enumerate())
        written[mode] = out.close()
    assert not any(t.name == "memsafe-merge-writer" for t in threading.enumerate())
    fore, back = written[False], written[True]
    assert [f.rows for f in back] == [f.rows for f in fore]
    for f, b in zip(fore, back, strict=True):
        assert Path(b.staged).read_bytes() == Path(f.staged).read_bytes()


def test_an_error_in_the_background_thread_surfaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = pq.ParquetWriter.write_table
    calls = {"n": 0}

    def flaky(self, table, row_group_size=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return original(self, table, row_group_size=row_group_size)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", flaky)
    out = sink(tmp_path, background=True)
    with pytest.raises(OSError, match="disk full"):
        for piece in pieces(table(10_000), IRREGULAR):
            out.write(piece)
        out.close()
    out.abort()
    assert not list(tmp_path.rglob("*.parquet"))
    assert not any(t.name == "memsafe-merge-writer" for t in threading.enumerate())


def test_abort_deletes_what_the_sink_opened_but_not_what_it_closed(tmp_path: Path) -> None:
    out = sink(tmp_path / "a", max_rows=2_500)
    for piece in pieces(table(10_000), IRREGULAR):
        out.write(piece)
    opened = [f.staged for f in out.written]
    assert len(opened) == 4 and all(Path(p).exists() for p in opened)  # the control
    out.abort()
    assert not any(Path(p).exists() for p in opened)
    with pytest.raises(ValueError, match="aborted"):
        out.write(table(1))

    kept = sink(tmp_path / "b")
    kept.write(table(10))
    [done] = kept.close()
    kept.abort()  # after a clean close the files are the caller's
    assert Path(done.staged).exists()
    with pytest.raises(ValueError, match="closed"):
        kept.write(table(1))


def test_threads_can_share_one_sink(tmp_path: Path) -> None:
    out = sink(tmp_path, max_rows=5_000)
    parts = pieces(table(40_000), [1_000] * 40)

    def feed(mine: list[pa.Table]) -> None:
        for piece in mine:
            out.write(piece)

    threads = [threading.Thread(target=feed, args=(parts[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = out.close()
    assert [f.rows for f in files] == [5_000] * 8
    assert all(row_groups(f.staged) == [1_000] * 5 for f in files)
    ids = pa.concat_tables(pq.read_table(f.staged) for f in files).column("id").to_pylist()
    assert sorted(ids) == list(range(40_000))


def test_sampled_dictionary_encoding_picks_the_repeating_columns(tmp_path: Path) -> None:
    out = sink(tmp_path, use_dictionary=None)
    out.write(table(5_000))  # status repeats (2 values); id and x are unique
    [written] = out.close()
    md = pq.read_metadata(written.staged).row_group(0)
    encodings = {md.column(i).path_in_schema: md.column(i).encodings for i in range(3)}
    assert any("DICTIONARY" in e for e in encodings["status"])
    assert not any("DICTIONARY" in e for e in encodings["id"])
    assert out.settings.get(table(1)).use_dictionary == ["status"]
