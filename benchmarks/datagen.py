"""Deterministic, streaming generator of upsert benchmark data, cached on disk.

A dataset is a *target* of N rows in F Parquet files and a *source* of M rows: half of them
update existing keys (every value changed, so verification can see the update) and half insert
new keys. Keys are int64 and come from bijections of the row index, so they are unique without
remembering them and generation never holds more than one chunk.

Layouts:

- ``random``: keys are a 64-bit mix of the row index, so every target file holds keys from
  the whole int64 range and a random source touches every file.
- ``clustered``: target files hold contiguous, sorted key ranges, and the source only touches
  ``touched_fraction`` of the files (updates and new keys both fall inside those files' ranges).

Run ``python -m benchmarks.datagen --help`` to generate a dataset by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

GENERATOR_VERSION = 1
ROW_GROUP_ROWS = 131_072
SOURCE_ROWS_PER_FILE = 1_000_000
SAMPLE_KEYS = 100
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / ".data"
PAYLOAD_COLUMNS = 8

SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("name", pa.string()),
        ("amount", pa.float64()),
        ("updated_at", pa.timestamp("us")),
        ("category", pa.string()),
    ]
)
CATEGORIES = (
    "retail",
    "wholesale",
    "online",
    "partner",
    "enterprise",
    "public",
    "education",
    "other",
)

_GOLDEN = 0x9E3779B97F4A7C15
_SALT_NAME, _SALT_AMOUNT, _SALT_TIME, _SALT_CATEGORY, _SALT_SLOT = (
    np.uint64(s) for s in (0x1F, 0x2E, 0x3D, 0x4C, 0x5B)
)
_US_PER_DAY = 86_400 * 1_000_000
_TARGET_EPOCH_US = 1_704_067_200 * 1_000_000  # 2024-01-01
_SOURCE_EPOCH_US = 1_748_736_000 * 1_000_000  # 2025-06-01

Layout = Literal["random", "clustered"]


@dataclass(frozen=True)
class DatasetSpec:
    """What to generate; equal specs map to the same cached directory."""

    layout: Layout
    target_rows: int
    target_files: int
    source_rows: int
    seed: int = 42
    touched_fraction: float = 0.05
    #: Bytes of string payload per row, in ``PAYLOAD_COLUMNS`` columns (0: the narrow schema).
    payload_bytes: int = 0
    #: Rows per target row group; 0 writes each file as one row group (pandas' default).
    row_group_rows: int = ROW_GROUP_ROWS

    def __post_init__(self) -> None:
        if self.layout not in ("random", "clustered"):
            raise ValueError(f"layout must be 'random' or 'clustered', got {self.layout!r}")
        if self.target_rows < self.target_files or self.target_files < 1:
            raise ValueError("need at least one target file and one row per file")
        if self.source_rows < 2:
            raise ValueError("the source needs at least two rows (one update, one insert)")

    @property
    def name(self) -> str:
        """The cache directory name: every parameter that changes the bytes."""
        touched = f"-t{self.touched_fraction:g}" if self.layout == "clustered" else ""
        wide = f"-p{self.payload_bytes}" if self.payload_bytes else ""
        if self.row_group_rows != ROW_GROUP_ROWS:
            wide += f"-rg{self.row_group_rows or 'file'}"
        return (
            f"{self.layout}-n{self.target_rows}-f{self.target_files}-m{self.source_rows}"
            f"-s{self.seed}{touched}{wide}-v{GENERATOR_VERSION}"
        )

    @property
    def schema(self) -> pa.Schema:
        """The narrow schema, plus the payload columns of a wide spec."""
        if not self.payload_bytes:
            return SCHEMA
        return pa.schema(
            list(SCHEMA) + [(f"payload{c}", pa.string()) for c in range(PAYLOAD_COLUMNS)]
        )

    @property
    def updates(self) -> int:
        return self.source_rows // 2

    @property
    def inserts(self) -> int:
        return self.source_rows - self.updates

    def file_bounds(self, f: int) -> tuple[int, int]:
        """The target row indices ``[start, end)`` written to file ``f``."""
        return f * self.target_rows // self.target_files, (
            (f + 1) * self.target_rows // self.target_files
        )

    def touched_files(self) -> list[int]:
        """Target files whose rows the source updates (all of them for ``random``)."""
        if self.layout == "random":
            return list(range(self.target_files))
        count = max(1, math.floor(self.target_files * self.touched_fraction))
        rng = np.random.default_rng(self.seed)
        return sorted(int(f) for f in rng.choice(self.target_files, size=count, replace=False))


@dataclass(frozen=True)
class GeneratedData:
    """A generated dataset on disk and its manifest (counts and sample keys to verify)."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, root: Path) -> GeneratedData:
        """A dataset generated earlier under ``root``."""
        return cls(root, json.loads((root / "manifest.json").read_text()))

    @property
    def target(self) -> Path:
        return self.root / "target"

    @property
    def source(self) -> Path:
        return self.root / "source"

    @property
    def expected_rows(self) -> int:
        return int(self.manifest["expected_rows"])


# -- keys ---------------------------------------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 that scatters consecutive inputs."""
    z = x.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


class _KeySpace:
    """Maps row indices to keys, and source positions to the target rows they update."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.offset = np.uint64(spec.seed * _GOLDEN % 2**64)
        bounds = [spec.file_bounds(f) for f in spec.touched_files()]
        self.pool_starts = np.array([s for s, _ in bounds], dtype=np.int64)
        sizes = np.array([e - s for s, e in bounds], dtype=np.int64)
        self.pool_offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.pool_size = int(self.pool_offsets[-1])
        if spec.updates > self.pool_size:
            raise ValueError(
                f"{spec.updates} updates do not fit the {self.pool_size} rows of the touched files"
            )
        if spec.layout == "clustered" and spec.inserts > self.pool_size:
            raise ValueError(f"{spec.inserts} inserts do not fit the touched files' key ranges")
        self.update_perm = _affine(self.pool_size, spec.seed, 0.6180339887)
        self.insert_perm = _affine(self.pool_size, spec.seed + 1, 0.7548776662)

    def target_keys(self, index: np.ndarray) -> np.ndarray:
        """The key of each target row index."""
        index = index.astype(np.uint64)
        if self.spec.layout == "random":
            return _mix(index + self.offset).view(np.int64)
        slot = _mix(index ^ _SALT_SLOT) % np.uint64(8)
        return (index * np.uint64(16) + slot).view(np.int64)

    def update_indices(self, j: np.ndarray) -> np.ndarray:
        """The target row index that source update ``j`` rewrites."""
        return self._pool_index(_apply(self.update_perm, j))

    def insert_keys(self, j: np.ndarray) -> np.ndarray:
        """The key of source insert ``j``: never a target key."""
        if self.spec.layout == "random":
            index = np.uint64(self.spec.target_rows) + j.astype(np.uint64)
            return _mix(index + self.offset).view(np.int64)
        index = self._pool_index(_apply(self.insert_perm, j)).astype(np.uint64)
        slot = np.uint64(8) + _mix(index ^ _SALT_SLOT) % np.uint64(8)
        return (index * np.uint64(16) + slot).view(np.int64)

    def is_updated(self, index: int) -> bool:
        """Whether target row ``index`` is one of the source's updates."""
        pos = np.searchsorted(self.pool_starts, index, side="right") - 1
        if pos < 0:
            return False
        pool_pos = index - int(self.pool_starts[pos]) + int(self.pool_offsets[pos])
        if pool_pos >= int(self.pool_offsets[pos + 1]):
            return False
        a, b, n = self.update_perm
        j = ((pool_pos - b) * pow(a, -1, n)) % n
        return j < self.spec.updates

    def _pool_index(self, pool_pos: np.ndarray) -> np.ndarray:
        file_pos = np.searchsorted(self.pool_offsets, pool_pos, side="right") - 1
        return self.pool_starts[file_pos] + (pool_pos - self.pool_offsets[file_pos])


def _affine(n: int, seed: int, ratio: float) -> tuple[int, int, int]:
    """``(a, b, n)`` with ``gcd(a, n) == 1``: ``j -> (a*j + b) % n`` permutes ``range(n)``."""
    if n >= 3_000_000_000:
        raise ValueError(f"{n} rows would overflow the int64 permutation")
    a = max(1, int(n * ratio)) | 1
    while math.gcd(a, n) != 1:
        a += 2
    return a, (seed * 7919) % n, n


def _apply(perm: tuple[int, int, int], j: np.ndarray) -> np.ndarray:
    a, b, n = perm
    return (j.astype(np.int64) * a + b) % n


# -- rows ---------------------------------------------------------------------------------------


def _with_payload(table: pa.Table, payload_bytes: int, *, source: bool) -> pa.Table:
    """``table`` plus ``PAYLOAD_COLUMNS`` string columns, ``payload_bytes`` per row in all: the
    key's digits and a filler that differs between target and source."""
    if not payload_bytes:
        return table
    width = max(24, payload_bytes // PAYLOAD_COLUMNS)
    digits = pc.utf8_lpad(pc.cast(table.column("id"), pa.string()), 20, "0")
    for c in range(PAYLOAD_COLUMNS):
        filler = (("src" if source else "tgt") + str(c)) * width
        column = pc.binary_join_element_wise(digits, pa.scalar(filler[: width - 21]), "-")
        table = table.append_column(f"payload{c}", column)
    return table


def _rows(keys: np.ndarray, *, source: bool) -> pa.Table:
    """Rows for ``keys``; source rows differ from target rows in every non-key column."""
    h = keys.view(np.uint64)
    name_num = pa.array(_mix(h ^ _SALT_NAME) % np.uint64(1_000_000))
    cents = (_mix(h ^ _SALT_AMOUNT) % np.uint64(10_000_000)).astype(np.float64) / 100.0
    span_us = np.uint64((30 if source else 365) * _US_PER_DAY)
    offsets = (_mix(h ^ _SALT_TIME) % span_us).astype(np.int64)
    epoch = _SOURCE_EPOCH_US if source else _TARGET_EPOCH_US
    category = (_mix(h ^ _SALT_CATEGORY) % np.uint64(len(CATEGORIES))).astype(np.int64)
    if source:
        category = (category + 1) % len(CATEGORIES)
    return pa.table(
        {
            "id": pa.array(keys, pa.int64()),
            "name": pc.binary_join_element_wise(
                "upd-" if source else "cust-", pc.cast(name_num, pa.string()), ""
            ),
            "amount": pa.array(-cents - 0.01 if source else cents),
            "updated_at": pa.array(offsets + epoch, pa.int64()).cast(pa.timestamp("us")),
            "category": pa.array(CATEGORIES).take(pa.array(category)),
        },
        schema=SCHEMA,
    )


def _target_chunks(keys: _KeySpace, f: int) -> Iterator[pa.Table]:
    start, end = keys.spec.file_bounds(f)
    for lo in range(start, end, ROW_GROUP_ROWS):
        index = np.arange(lo, min(lo + ROW_GROUP_ROWS, end), dtype=np.int64)
        rows = _rows(keys.target_keys(index), source=False)
        yield _with_payload(rows, keys.spec.payload_bytes, source=False)


def _source_chunks(keys: _KeySpace) -> Iterator[pa.Table]:
    """Updates and inserts interleaved, shuffled within each chunk."""
    spec = keys.spec
    rng = np.random.default_rng(spec.seed + 2)
    half = ROW_GROUP_ROWS // 2
    for lo in range(0, max(spec.updates, spec.inserts), half):
        upd = np.arange(lo, min(lo + half, spec.updates), dtype=np.int64)
        ins = np.arange(lo, min(lo + half, spec.inserts), dtype=np.int64)
        chunk_keys = np.concatenate(
            [keys.target_keys(keys.update_indices(upd)), keys.insert_keys(ins)]
        )
        rows = _rows(rng.permutation(chunk_keys), source=True)
        yield _with_payload(rows, spec.payload_bytes, source=True)


def _write_rolling(
    chunks: Iterator[pa.Table], directory: Path, rows_per_file: int, schema: pa.Schema = SCHEMA
) -> None:
    """Write chunks into ``part-NNNNN.parquet`` files of at most ``rows_per_file`` rows."""
    directory.mkdir(parents=True)
    writer: pq.ParquetWriter | None = None
    files = rows_in_file = 0
    try:
        for chunk in chunks:
            while chunk.num_rows:
                if writer is None or rows_in_file == rows_per_file:
                    if writer is not None:
                        writer.close()
                    writer = pq.ParquetWriter(directory / f"part-{files:05d}.parquet", schema)
                    files, rows_in_file = files + 1, 0
                take = min(chunk.num_rows, rows_per_file - rows_in_file)
                writer.write_table(chunk.slice(0, take), row_group_size=ROW_GROUP_ROWS)
                chunk, rows_in_file = chunk.slice(take), rows_in_file + take
    finally:
        if writer is not None:
            writer.close()


# -- samples for verification -------------------------------------------------------------------


def _samples(keys: _KeySpace) -> dict[str, list[int]]:
    spec = keys.spec
    upd = np.linspace(0, spec.updates - 1, min(SAMPLE_KEYS, spec.updates)).astype(np.int64)
    ins = np.linspace(0, spec.inserts - 1, min(SAMPLE_KEYS, spec.inserts)).astype(np.int64)
    rng = np.random.default_rng(spec.seed + 3)
    untouched: list[int] = []
    candidates = rng.choice(spec.target_rows, size=min(4 * SAMPLE_KEYS, spec.target_rows))
    for index in np.unique(candidates):
        if len(untouched) == SAMPLE_KEYS:
            break
        if not keys.is_updated(int(index)):
            untouched.append(int(index))
    return {
        "sample_updated_keys": keys.target_keys(keys.update_indices(upd)).tolist(),
        "sample_new_keys": keys.insert_keys(ins).tolist(),
        "sample_untouched_keys": keys.target_keys(np.array(untouched, dtype=np.int64)).tolist(),
    }


# -- entry points -------------------------------------------------------------------------------


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def generate(spec: DatasetSpec, root: Path) -> GeneratedData:
    """Write ``spec`` under ``root`` (which must not exist) and return it."""
    started = time.perf_counter()
    keys = _KeySpace(spec)
    (root / "target").mkdir(parents=True)
    for f in range(spec.target_files):
        path = root / "target" / f"part-{f:05d}.parquet"
        if spec.row_group_rows == 0:
            # What pandas.to_parquet writes by default: the whole file as one row group.
            pq.write_table(pa.concat_tables(_target_chunks(keys, f)), path)
            continue
        with pq.ParquetWriter(path, spec.schema) as writer:
            for chunk in _target_chunks(keys, f):
                writer.write_table(chunk, row_group_size=spec.row_group_rows)
    _write_rolling(_source_chunks(keys), root / "source", SOURCE_ROWS_PER_FILE, spec.schema)
    manifest: dict[str, Any] = {
        "spec": asdict(spec),
        "generator_version": GENERATOR_VERSION,
        "expected_rows": spec.target_rows + spec.inserts,
        "updated": spec.updates,
        "inserted": spec.inserts,
        "touched_files": [f"part-{f:05d}.parquet" for f in spec.touched_files()],
        "row_group_rows": spec.row_group_rows,
        "target_bytes": _dir_bytes(root / "target"),
        "source_bytes": _dir_bytes(root / "source"),
        "generated_s": round(time.perf_counter() - started, 2),
        **_samples(keys),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return GeneratedData(root, manifest)


def ensure_dataset(spec: DatasetSpec, data_dir: Path = DEFAULT_DATA_DIR) -> GeneratedData:
    """The cached dataset for ``spec`` under ``data_dir``, generated on first use.

    Generation happens in a temporary sibling directory that is renamed into place only once
    complete, so an interrupted run never leaves a half-written dataset in the cache.
    """
    root = Path(data_dir) / spec.name
    if (root / "manifest.json").exists():
        return GeneratedData.load(root)
    tmp = Path(data_dir) / f".tmp-{spec.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(spec, tmp)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return GeneratedData.load(root)


def main(argv: list[str] | None = None) -> None:
    """Generate (or find in the cache) one dataset and print its directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=["random", "clustered"], default="random")
    parser.add_argument("--rows", type=int, default=1_000_000, help="target rows")
    parser.add_argument("--files", type=int, default=10, help="target files")
    parser.add_argument("--source-rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--touched-fraction", type=float, default=0.05, help="clustered only")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    spec = DatasetSpec(
        args.layout, args.rows, args.files, args.source_rows, args.seed, args.touched_fraction
    )
    print(ensure_dataset(spec, args.data_dir).root)


if __name__ == "__main__":
    main()
