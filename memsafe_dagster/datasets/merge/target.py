"""The target as the merge sees it: its files, their footers, key statistics and matched rows.

Only footers are read here. Each row group's min/max of every key column becomes a bound in
the key index's domain (codes for integer-like keys, str/bytes for string/binary keys), so a
row group whose bounds hold no source key is never read and a file made only of such row
groups is never rewritten.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from memsafe_dagster.datasets.filesystem import list_data_files
from memsafe_dagster.datasets.keys import exact_code_of, is_exact_type, key_value_type
from memsafe_dagster.datasets.merge.bits import BitSet
from memsafe_dagster.datasets.merge.validate import target_fields_check
from memsafe_dagster.datasets.schema import type_kind

Bound = tuple[object, object] | None

_UNIT_NAMES = {"ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
_INS_NAME = re.compile(r"^ins-.*\.parquet$")


@dataclass
class TargetFile:
    """One data file of the target: footer facts plus the rows the merge matched in it."""

    path: str
    rel: str
    metadata: pq.FileMetaData
    schema: pa.Schema
    rows: int
    rg_starts: np.ndarray
    bounds: list[list[Bound]]
    matched_rows: BitSet | None = None
    matched: int = 0
    key_scanned: set[int] = field(default_factory=set)

    @property
    def num_row_groups(self) -> int:
        return len(self.rg_starts) - 1

    @property
    def is_ins_file(self) -> bool:
        """Written by an earlier merge to hold new rows (a compaction candidate)."""
        return "/" not in self.rel and bool(_INS_NAME.match(self.rel))

    def file_bounds(self) -> list[Bound]:
        """Per key column, the bound over all row groups (None when any row group lacks one)."""
        if not self.bounds:
            return []
        out: list[Bound] = []
        for col in range(len(self.bounds[0])):
            col_bounds = [rg[col] for rg in self.bounds]
            if any(b is None for b in col_bounds):
                out.append(None)
            else:
                out.append(
                    (min(b[0] for b in col_bounds), max(b[1] for b in col_bounds))  # type: ignore[index]
                )
        return out

    def mark(self, rows: np.ndarray) -> None:
        """Mark file-global row numbers as matched (marking a row twice is harmless)."""
        if len(rows) == 0:
            return
        if self.matched_rows is None:
            self.matched_rows = BitSet(self.rows)
        self.matched_rows.set(rows)

    def finish_marking(self) -> None:
        """Count the matched rows (rows matched in several passes are counted once)."""
        self.matched = 0 if self.matched_rows is None else self.matched_rows.count()

    def matched_mask(self, start: int, stop: int) -> np.ndarray:
        """Bool per row of [start, stop): True where the row matched a source key."""
        if self.matched_rows is None:
            return np.zeros(stop - start, dtype=bool)
        return self.matched_rows.slice(start, stop)


@dataclass
class TargetDataset:
    """The target's files (sorted by path) and the schema every output file keeps."""

    root: str
    files: list[TargetFile]
    schema: pa.Schema | None

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


def load_target(
    fs: fsspec.AbstractFileSystem,
    afs: pafs.FileSystem,
    root: str,
    keys: Sequence[str],
    paths: Sequence[str] | None = None,
) -> TargetDataset:
    """Read every data file's footer (of ``paths``, by default all under ``root``) and check
    the files agree on a schema with the keys."""
    paths = list_data_files(fs, root) if paths is None else paths
    root = root.rstrip("/")
    files: list[TargetFile] = []
    schema: pa.Schema | None = None
    for path in paths:
        rel = path[len(root) :].lstrip("/") if path.startswith(root) else path
        if any("=" in part for part in rel.split("/")[:-1]):
            raise ValueError(
                f"target {root} is partitioned by directory ({rel}); merge each partition "
                "directory as its own target"
            )
        metadata, file_schema = read_footer(afs, path)
        if schema is None:
            schema = file_schema
            target_fields_check(schema, keys)
        else:
            _check_file_schema(schema, file_schema, path, keys)
        files.append(_target_file(path, rel, metadata, file_schema, schema, keys))
    return TargetDataset(root, files, schema)


def read_footer(afs: pafs.FileSystem, path: str) -> tuple[pq.FileMetaData, pa.Schema]:
    """A data file's footer and Arrow schema; ValueError when it is no readable Parquet file."""
    try:
        with afs.open_input_file(path) as fh:
            metadata = pq.read_metadata(fh)
        return metadata, metadata.schema.to_arrow_schema()
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"target file {path} is not a readable Parquet file: {exc}") from exc


def target_file(
    afs: pafs.FileSystem, path: str, rel: str, schema: pa.Schema, keys: Sequence[str]
) -> TargetFile:
    """One data file as the merge sees it, its key bounds in ``schema``'s key types (for
    targets that list and check their files themselves, such as table formats)."""
    metadata, file_schema = read_footer(afs, path)
    return _target_file(path, rel, metadata, file_schema, schema, keys)


def _check_file_schema(
    dataset: pa.Schema, file_schema: pa.Schema, path: str, keys: Sequence[str]
) -> None:
    extra = [n for n in file_schema.names if dataset.get_field_index(n) < 0]
    if extra:
        raise ValueError(
            f"target file {path} has column(s) {extra} that the dataset schema (from its first "
            "file) lacks; rewriting it would drop them"
        )
    for expected in dataset:
        idx = file_schema.get_field_index(expected.name)
        if idx < 0:
            if expected.name in keys or not expected.nullable:
                raise ValueError(f"target file {path} lacks column {expected.name!r}")
            continue
        ft = file_schema.field(idx).type
        if ft != expected.type and type_kind(ft) != type_kind(expected.type):
            raise ValueError(
                f"target file {path}: column {expected.name!r} is {ft}, but the dataset's is "
                f"{expected.type}"
            )


def _target_file(
    path: str,
    rel: str,
    metadata: pq.FileMetaData,
    file_schema: pa.Schema,
    schema: pa.Schema,
    keys: Sequence[str],
) -> TargetFile:
    n_rg = metadata.num_row_groups
    counts = [metadata.row_group(i).num_rows for i in range(n_rg)]
    starts = np.zeros(n_rg + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    columns: dict[str, int] = {}
    if n_rg:
        rg0 = metadata.row_group(0)
        columns = {rg0.column(i).path_in_schema: i for i in range(rg0.num_columns)}
    converters = []
    for k in keys:
        idx = file_schema.get_field_index(k)
        file_type = file_schema.field(idx).type if idx >= 0 else None
        converters.append((columns.get(k), _bound_converter(file_type, schema.field(k).type)))
    bounds: list[list[Bound]] = []
    for i in range(n_rg):
        rg = metadata.row_group(i)
        row: list[Bound] = []
        for col, convert in converters:
            bound = None
            if col is not None and convert is not None:
                stats = rg.column(col).statistics
                if stats is not None and stats.has_min_max:
                    try:
                        bound = convert(stats)
                    except (ValueError, TypeError, OverflowError, pa.ArrowException):
                        bound = None
            row.append(bound)
        bounds.append(row)
    return TargetFile(
        path=path,
        rel=rel,
        metadata=metadata,
        schema=file_schema,
        rows=metadata.num_rows,
        rg_starts=starts,
        bounds=bounds,
    )


def _bound_converter(file_type: pa.DataType | None, target_type: pa.DataType):
    """A function from Parquet statistics to a bound in the index's domain, or None."""
    if file_type is None:
        return None
    ft, vt = key_value_type(file_type), key_value_type(target_type)
    if ft != vt and not _same_width_free(ft, vt):
        return None  # a file written with another type: no pruning, never a wrong one
    if pa.types.is_integer(vt):
        return lambda s: (exact_code_of(s.min, vt), exact_code_of(s.max, vt))
    if is_exact_type(vt):
        if pa.types.is_date32(vt):
            return lambda s: _raw_bound(s, vt)
        if pa.types.is_timestamp(vt) or pa.types.is_time(vt):
            unit = _UNIT_NAMES.get(vt.unit)
            if unit is None:
                return None

            def convert(s):
                if f"timeUnit={unit}" not in str(s.logical_type):
                    return None
                return _raw_bound(s, vt)

            return convert
        return None
    if pa.types.is_string(vt) or pa.types.is_large_string(vt):
        return lambda s: (s.min, s.max) if isinstance(s.min, str) else None
    if pa.types.is_binary(vt) or pa.types.is_large_binary(vt):
        return lambda s: (bytes(s.min), bytes(s.max))
    return None


def _same_width_free(a: pa.DataType, b: pa.DataType) -> bool:
    """string and large_string (binary and large_binary) give the same bounds."""
    strings = (pa.types.is_string, pa.types.is_large_string)
    binaries = (pa.types.is_binary, pa.types.is_large_binary)
    return any(any(t(a) for t in kind) and any(t(b) for t in kind) for kind in (strings, binaries))


def _raw_bound(stats: pq.Statistics, t: pa.DataType) -> Bound:
    lo, hi = stats.min_raw, stats.max_raw
    if not isinstance(lo, int) or not isinstance(hi, int):
        return None
    return exact_code_of(lo, pa.int64()), exact_code_of(hi, pa.int64())
