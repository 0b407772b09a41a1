"""Shared helpers for the merge tests: datasets on disk, an oracle, row sets, child processes.

Nothing here builds an Arrow array at import time: that imports pandas (about 50 MB of RSS),
which would inflate the memory the child processes measure.

Run as a script it is the child process of the crash, lock and memory tests:
``python tests/merge_helpers.py merge SOURCE TARGET KEY [json-kwargs]`` prints the MergeResult as
JSON after a ``READY`` line; ``generate`` writes the big upsert dataset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve()

# -- small datasets ------------------------------------------------------------------------


def write_files(
    directory: str | Path, tables: Sequence[pa.Table], prefix: str = "part"
) -> list[Path]:
    """Write each table as ``<prefix>-NNNNN.parquet`` under ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, table in enumerate(tables):
        path = directory / f"{prefix}-{i:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


def data_files(directory: str | Path) -> list[Path]:
    """The dataset's data files (hidden ``_``/``.`` paths skipped, as readers do)."""
    directory = Path(directory)
    if not directory.exists():
        return []
    out = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and not any(p.startswith(("_", ".")) for p in rel.parts):
            out.append(path)
    return out


def read_dataset(directory: str | Path, schema: pa.Schema | None = None) -> pa.Table:
    """Every data file's rows, concatenated (one schema required unless ``schema`` is given)."""
    tables = [pq.read_table(p) for p in data_files(directory)]
    if not tables:
        return (schema or pa.schema([])).empty_table()
    return pa.concat_tables(tables)


def row_set(table: pa.Table) -> list[tuple]:
    """The rows of ``table`` as a sorted list of tuples (a multiset: duplicates kept)."""
    names = sorted(table.column_names)
    rows = zip(*(table.column(n).to_pylist() for n in names), strict=True) if names else []
    return sorted((tuple(r) for r in rows), key=repr)


def snapshot(directory: str | Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones included) and its bytes."""
    directory = Path(directory)
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftover_state(directory: str | Path, fs: Any = None) -> list[str]:
    """What a finished writer left under ``_memsafe`` besides the commit log and the trash
    (the dataset's history, kept for readers within the retention): staging, records or a
    lock would be listed here."""
    root = f"{str(directory).rstrip('/')}/_memsafe"
    if fs is None:
        here = Path(root)
        found = [str(p) for p in here.rglob("*") if p.is_file()] if here.exists() else []
    else:
        found = list(fs.find(root)) if fs.exists(root) else []
    history = ("/_memsafe/log/", "/_memsafe/trash/")
    return [f for f in found if not any(h in f.replace("\\", "/") for h in history)]


def without_state(files: Any) -> list[str]:
    """The names among ``files`` (a ``snapshot`` or a listing) outside ``_memsafe``."""
    return [f for f in files if "_memsafe" not in str(f).replace("\\", "/").split("/")]


# -- the oracle ----------------------------------------------------------------------------


class OracleDuplicate(ValueError):
    pass


def oracle(
    target: list[dict[str, Any]],
    source: list[dict[str, Any]],
    strategy: str,
    keys: Sequence[str],
    on_duplicate: str = "error",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The rows after the merge, by the DESIGN.md table, and the expected counts."""

    def key(row: dict[str, Any]) -> tuple:
        return tuple(row[k] for k in keys)

    src: dict[tuple, dict[str, Any]] = {}
    for row in source:
        k = key(row)
        if k in src:
            if on_duplicate == "error":
                raise OracleDuplicate(k)
            if on_duplicate == "first":
                continue
        src[k] = row
    target_keys = {key(r) for r in target}
    out: list[dict[str, Any]] = []
    counts = {"inserted": 0, "updated": 0, "deleted": 0}
    for row in target:
        k = key(row)
        if k in src:
            if strategy == "insert":
                out.append(row)
            elif strategy == "delete":
                counts["deleted"] += 1
            else:
                counts["updated"] += 1
        elif strategy == "full_merge":
            counts["deleted"] += 1
        else:
            out.append(row)
    for k, row in src.items():
        if k in target_keys:
            if strategy in ("update", "upsert", "full_merge"):
                out.append(row)
        elif strategy in ("insert", "upsert", "full_merge"):
            out.append(row)
            counts["inserted"] += 1
    return out, counts


def rows_of(table: pa.Table, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows as dicts over ``columns`` (missing columns are None)."""
    data = {c: (table.column(c).to_pylist() if c in table.column_names else None) for c in columns}
    return [
        {c: (data[c][i] if data[c] is not None else None) for c in columns}
        for i in range(table.num_rows)
    ]


def dict_rows_set(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> list[tuple]:
    names = sorted(columns)
    return sorted((tuple(r[c] for c in names) for r in rows), key=repr)


# -- the big upsert dataset (10M / 1M shape) ---------------------------------------------------

SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("name", pa.string()),
        ("amount", pa.float64()),
        ("updated_at", pa.timestamp("us")),
        ("category", pa.string()),
    ]
)
_CATEGORIES = ["retail", "wholesale", "online", "partner", "enterprise", "other"]


def _mix(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _key(index: np.ndarray) -> np.ndarray:
    """Random-looking unique int64 keys: a bijection of the row index."""
    return _mix(index.astype(np.uint64) + np.uint64(12345)).view(np.int64)


def _rows(index: np.ndarray, *, source: bool) -> pa.Table:
    keys = _key(index)
    h = keys.view(np.uint64)
    num = pa.array(h % np.uint64(1_000_000))
    prefix = "upd-" if source else "cust-"
    return pa.table(
        {
            "id": pa.array(keys),
            "name": pc.binary_join_element_wise(prefix, pc.cast(num, pa.string()), ""),
            "amount": pa.array(
                (h % np.uint64(10_000_000)).astype(np.float64) / 100.0 * (-1.0 if source else 1.0)
            ),
            "updated_at": pa.array(
                (h % np.uint64(86_400_000_000 * 365)).astype(np.int64)
                + (1_750_000_000_000_000 if source else 1_700_000_000_000_000),
                pa.int64(),
            ).cast(pa.timestamp("us")),
            "category": pa.array(_CATEGORIES).take(pa.array((h % np.uint64(6)).astype(np.int64))),
        },
        schema=SCHEMA,
    )


def generate_upsert_data(
    root: str | Path, target_rows: int, files: int, source_rows: int, row_group: int = 131_072
) -> dict[str, Any]:
    """A target of ``target_rows`` rows in ``files`` files (random int64 keys) and a source of
    ``source_rows`` rows, half updating target rows (spread over every file), half new.

    Streams: never more than one row group in memory. Returns a manifest with sample keys.
    """
    root = Path(root)
    (root / "target").mkdir(parents=True)
    (root / "source").mkdir(parents=True)
    per_file = target_rows // files
    for f in range(files):
        start, stop = f * per_file, (f + 1) * per_file if f < files - 1 else target_rows
        with pq.ParquetWriter(root / "target" / f"part-{f:05d}.parquet", SCHEMA) as w:
            for lo in range(start, stop, row_group):
                w.write_table(
                    _rows(np.arange(lo, min(lo + row_group, stop)), source=False),
                    row_group_size=row_group,
                )
    updates = source_rows // 2
    step = max(1, target_rows // max(1, updates))
    updated_index = (np.arange(updates, dtype=np.int64) * step) % target_rows
    new_index = np.arange(target_rows, target_rows + source_rows - updates, dtype=np.int64)
    index = np.concatenate([updated_index, new_index])
    index = np.random.default_rng(7).permutation(index)
    with pq.ParquetWriter(root / "source" / "part-00000.parquet", SCHEMA) as w:
        for lo in range(0, len(index), row_group):
            w.write_table(_rows(index[lo : lo + row_group], source=True), row_group_size=row_group)
    manifest = {
        "target_rows": target_rows,
        "source_rows": source_rows,
        "updates": updates,
        "expected_rows": target_rows + source_rows - updates,
        "sample_updated": _key(updated_index[:: max(1, updates // 50)]).tolist(),
        "sample_new": _key(new_index[:: max(1, len(new_index) // 50)]).tolist(),
        "sample_untouched": _key(np.array([1, 3, 5, 7], dtype=np.int64) * step + 1).tolist(),
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def check_upsert_result(target: str | Path, manifest: dict[str, Any]) -> None:
    """Row count, unique keys, and sampled updated/new/untouched rows of a finished upsert."""
    files = data_files(target)
    wanted = pa.array(
        manifest["sample_updated"] + manifest["sample_new"] + manifest["sample_untouched"],
        pa.int64(),
    )
    ids = []
    found: dict[int, str] = {}
    for f in files:
        t = pq.read_table(f, columns=["id", "name"])
        ids.append(t.column("id").combine_chunks())
        hit = t.filter(pc.is_in(t.column("id"), value_set=wanted))
        found.update(zip(hit.column("id").to_pylist(), hit.column("name").to_pylist(), strict=True))
    all_ids = np.sort(np.concatenate([np.asarray(a) for a in ids]))
    assert len(all_ids) == manifest["expected_rows"], (len(all_ids), manifest["expected_rows"])
    assert (all_ids[1:] != all_ids[:-1]).all(), "duplicate keys after the upsert"
    for k in manifest["sample_updated"] + manifest["sample_new"]:
        assert found[k].startswith("upd-"), (k, found.get(k))
    for k in manifest["sample_untouched"]:
        assert found[k].startswith("cust-"), (k, found.get(k))


# -- child processes ------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MEMSAFE_MEMORY_LIMIT", None)
    env.pop("CONTAINER_MEMORY_LIMIT", None)
    env.update(extra)
    return env


def merge_argv(source: str | Path, target: str | Path, key: str, **kwargs: Any) -> list[str]:
    """argv of a child that merges ``source`` into ``target`` and prints the result."""
    return [sys.executable, str(HELPER), "merge", str(source), str(target), key, json.dumps(kwargs)]


def start_merge(source, target, key, *, env: dict[str, str] | None = None, **kwargs):
    """Start a merging child; returns the Popen once it printed READY (imports done)."""
    proc = subprocess.Popen(
        merge_argv(source, target, key, **kwargs),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env or child_env(),
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise AssertionError(f"child did not start: {line!r} {proc.stderr.read()}")
    return proc


def _child_merge(argv: list[str]) -> int:
    source, target, key, raw = argv
    kwargs = json.loads(raw)
    sleep_per_chunk = kwargs.pop("sleep_per_progress_s", 0.0)
    import fsspec

    from memsafe_dagster.datasets.merge import merge_dataset

    print("READY", flush=True)

    def progress(done: int, total: int) -> None:
        if sleep_per_chunk:
            time.sleep(sleep_per_chunk)

    result = merge_dataset(
        source,
        target,
        fs=fsspec.filesystem("file"),
        key_columns=key.split(","),
        merge_progress_callback=progress,
        **kwargs,
    )
    print(json.dumps(result.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "merge":
        sys.exit(_child_merge(rest))
    if command == "generate":
        root, target_rows, files, source_rows = rest
        generate_upsert_data(root, int(target_rows), int(files), int(source_rows))
        sys.exit(0)
    raise SystemExit(f"unknown command {command!r}")
