"""verify_unique_keys: does every key occur once in a Parquet dataset? Counted in bounded memory.

The merge asset's ``unique_keys`` check runs it on the target after each merge, and it is usable
on any dataset. Only the key columns are read, chunk by chunk. When they would not fit the
budget (sized from the files' footers), rows are first spilled to local Arrow IPC files by
bucket, so every occurrence of a key lands in one bucket, and each bucket is grouped exactly.
Buckets come from the merge's own key codes (``datasets.keys.KeyCodec``), mixed, so the check and
the merge agree on what makes two keys equal.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from memsafe_dagster.datasets.filesystem import (
    arrow_filesystem,
    list_data_files,
    resolve_filesystem,
)
from memsafe_dagster.datasets.keys import KeyCodec, mix, normalize_key_columns
from memsafe_dagster.datasets.reader import iter_file_batches, open_parquet
from memsafe_dagster.memory.sizes import MiB

# Bytes of memory per byte of key data while grouping (the hash table and the counts).
GROUP_BY_OVERHEAD = 3
MAX_BUCKETS = 4096
MAX_EXAMPLES = 5
# Every row with a null in a key column gets this bucket hash (null keys equal each other).
NULL_KEY_HASH = np.uint64(0x5BD1E9955BD1E995)


@dataclass
class UniqueKeysReport:
    """What ``verify_unique_keys`` found: rows, repeated keys and the rows holding them, rows
    with a null key, how many buckets the keys were split into, and a few repeated keys."""

    rows: int = 0
    duplicate_keys: int = 0
    duplicate_rows: int = 0
    null_key_rows: int = 0
    buckets: int = 1
    largest_bucket_rows: int = 0
    duration_s: float = 0.0
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.duplicate_keys == 0 and self.null_key_rows == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "rows": self.rows,
            "duplicate_keys": self.duplicate_keys,
            "duplicate_rows": self.duplicate_rows,
            "null_key_rows": self.null_key_rows,
            "buckets": self.buckets,
            "largest_bucket_rows": self.largest_bucket_rows,
            "duration_s": round(self.duration_s, 4),
            "examples": self.examples,
        }


def verify_unique_keys(
    path: str,
    key_columns: str | Sequence[str],
    *,
    filesystem: fsspec.AbstractFileSystem | None = None,
    storage_options: Mapping[str, Any] | None = None,
    memory_budget_mb: float = 256,
    chunk_size_rows: int = 65_536,
    spill_dir: str | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> UniqueKeysReport:
    """Count keys that occur more than once in the Parquet dataset at ``path``, in bounded memory.

    Reads only the key columns, chunk by chunk; keys that would not fit ``memory_budget_mb``
    are spilled to ``spill_dir`` (default: a temporary directory) by bucket first.
    ``on_chunk`` runs before each chunk and each bucket (a pressure check may raise there).
    """
    keys = list(normalize_key_columns(key_columns))
    started = time.perf_counter()
    if filesystem is None:
        fs, root = resolve_filesystem(path, storage_options=storage_options)
    else:
        fs, root = filesystem, filesystem._strip_protocol(path)
    files = [f for f in list_data_files(fs, root) if f.endswith(".parquet")]
    report = UniqueKeysReport()
    if not files:
        report.duration_s = time.perf_counter() - started
        return report
    afs = arrow_filesystem(fs)
    budget = max(1, int(memory_budget_mb * MiB))
    needed = math.ceil(_key_bytes(afs, files, keys) * GROUP_BY_OVERHEAD / budget)
    buckets = 1 if needed <= 1 else min(MAX_BUCKETS, 1 << (needed - 1).bit_length())
    report.buckets = buckets
    chunks = _key_chunks(afs, files, keys, chunk_size_rows, on_chunk)
    if buckets == 1:
        parts = list(chunks)
        if parts:
            table = pa.concat_tables(parts, promote_options="permissive")
            report.largest_bucket_rows = table.num_rows
            _group(table, keys, report)
    else:
        with tempfile.TemporaryDirectory(prefix="memsafe-unique-", dir=spill_dir) as tmp:
            _spilled(chunks, keys, buckets, tmp, report, on_chunk)
    report.duration_s = time.perf_counter() - started
    return report


def key_hash(table: pa.Table, keys: Sequence[str]) -> np.ndarray:
    """A well-mixed uint64 per row of the key columns: equal keys give equal hashes.

    It is the merge's key code (``KeyCodec``) passed through ``mix``, since exact codes of
    integer-like keys are the values themselves and would crowd into few buckets. Floats
    (which the merge refuses as keys) are coded by their bits, -0.0 as 0.0; every row with a
    null in a key column gets ``NULL_KEY_HASH``.
    """
    keys = list(keys)
    hashable = pa.table([_hashable(table.column(k)) for k in keys], names=keys)
    codec = KeyCodec(hashable.schema, keys)
    try:
        codes, valid = codec.codes(codec.key_arrays(hashable))
    except ValueError as exc:
        raise ValueError(f"key column(s) {keys} cannot be checked: {exc}") from None
    mixed = mix(codes)
    if valid is not None:
        mixed[~valid] = NULL_KEY_HASH
    return mixed


def _hashable(column: pa.ChunkedArray) -> pa.Array:
    """One key column as an array ``KeyCodec`` can code (floats as their bit patterns)."""
    array = column.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if pa.types.is_null(array.type):
        return pa.nulls(len(array), pa.int64())
    if pa.types.is_floating(array.type):
        # Adding 0.0 turns -0.0 into 0.0, which grouping treats as equal.
        return pc.add(pc.cast(array, pa.float64()), 0.0).view(pa.int64())
    return array


def _key_bytes(afs: pafs.FileSystem, files: Sequence[str], keys: Sequence[str]) -> int:
    """Uncompressed bytes of the key columns over every file (footers only)."""
    total = 0
    for f in files:
        with afs.open_input_file(f) as fh:
            meta = pq.ParquetFile(fh, pre_buffer=False).metadata
        names = set(meta.schema.to_arrow_schema().names)
        missing = [k for k in keys if k not in names]
        if missing:
            raise ValueError(f"key column(s) {missing} missing from {f}")
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".", 1)[0] in keys:
                    total += column.total_uncompressed_size
    return total


def _key_chunks(
    afs: pafs.FileSystem,
    files: Sequence[str],
    keys: list[str],
    chunk_size_rows: int,
    on_chunk: Callable[[], None] | None,
) -> Iterator[pa.Table]:
    for f in files:
        with afs.open_input_file(f) as fh:
            for batch in iter_file_batches(open_parquet(fh), chunk_size_rows, columns=keys):
                if on_chunk is not None:
                    on_chunk()
                yield pa.Table.from_batches([batch]).select(keys)


def _spilled(
    chunks: Iterator[pa.Table],
    keys: list[str],
    buckets: int,
    tmp: str,
    report: UniqueKeysReport,
    on_chunk: Callable[[], None] | None,
) -> None:
    """Write each chunk's rows to their bucket's IPC file (top bits of ``key_hash``), then
    group bucket by bucket."""
    shift = np.uint64(64 - (buckets.bit_length() - 1))
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    sinks: dict[int, Any] = {}
    rows_per_bucket = np.zeros(buckets, dtype=np.int64)
    schema: pa.Schema | None = None
    try:
        for table in chunks:
            if table.num_rows == 0:
                continue
            table = table.combine_chunks()
            if schema is None:
                schema = table.schema
            elif not table.schema.equals(schema):
                table = table.cast(schema)
            bucket = (key_hash(table, keys) >> shift).astype(np.int64)
            order = np.argsort(bucket, kind="stable")
            counts = np.bincount(bucket, minlength=buckets)
            rows_per_bucket += counts
            ordered = table.take(pa.array(order))
            start = 0
            for b in np.flatnonzero(counts):
                n = int(counts[b])
                if b not in writers:
                    sinks[b] = pa.OSFile(os.path.join(tmp, f"{b:05d}.arrow"), "wb")
                    writers[b] = pa.ipc.new_stream(sinks[b], schema)
                writers[b].write_table(ordered.slice(start, n))
                start += n
    finally:
        for writer in writers.values():
            writer.close()
        for sink in sinks.values():
            sink.close()
    report.largest_bucket_rows = int(rows_per_bucket.max(initial=0))
    for b in sorted(writers):
        if on_chunk is not None:
            on_chunk()
        with pa.OSFile(os.path.join(tmp, f"{b:05d}.arrow"), "rb") as fh:
            table = pa.ipc.open_stream(fh).read_all()
        _group(table, keys, report)
        del table


def _group(table: pa.Table, keys: list[str], report: UniqueKeysReport) -> None:
    """Count rows, null keys and repeated keys of ``table`` (every occurrence of its keys)."""
    report.rows += table.num_rows
    nulls = None
    for k in keys:
        is_null = pc.is_null(table[k])
        nulls = is_null if nulls is None else pc.or_(nulls, is_null)
    report.null_key_rows += int(pc.sum(nulls.cast(pa.int64())).as_py() or 0)
    counts = table.group_by(keys, use_threads=False).aggregate([([], "count_all")])
    repeated = counts.filter(pc.greater(counts["count_all"], 1))
    if repeated.num_rows:
        report.duplicate_keys += repeated.num_rows
        report.duplicate_rows += int(pc.sum(repeated["count_all"]).as_py())
        room = MAX_EXAMPLES - len(report.examples)
        if room > 0:
            for row in repeated.slice(0, room).to_pylist():
                count = row.pop("count_all")
                report.examples.append({"key": _jsonable(row), "count": count})


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
        for k, v in row.items()
    }
