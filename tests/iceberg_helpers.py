"""Shared helpers for the Iceberg tests: an embedded catalog, tables, scans, child processes.

The catalog is pyiceberg's SQL catalog on a SQLite file with a local (or S3) warehouse, the
same code path a production SQL catalog takes. Run as a script it is the child process of the
crash, concurrency and memory tests::

    python tests/iceberg_helpers.py merge CATALOG_JSON TABLE SOURCE STRATEGY KEYS [json-kwargs]

prints ``READY`` once imports are done, then the merge's result as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve()
CATALOG_NAME = "memsafe_test"


def catalog_properties(base: str | Path, warehouse: str | None = None) -> dict[str, str]:
    """Properties of a SQL catalog on ``base``/catalog.db, warehouse under ``base``."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    return {
        "uri": f"sqlite:///{base}/catalog.db",
        "warehouse": warehouse or f"file://{base}/warehouse",
    }


def make_catalog(base: str | Path, warehouse: str | None = None, **extra: str):
    """A SQL catalog (SQLite) with namespace ``ns``."""
    from pyiceberg.catalog.sql import SqlCatalog

    catalog = SqlCatalog(CATALOG_NAME, **catalog_properties(base, warehouse), **extra)
    catalog.create_namespace_if_not_exists("ns")
    return catalog


def load_catalog_from(properties: dict[str, str]):
    from pyiceberg.catalog.sql import SqlCatalog

    return SqlCatalog(CATALOG_NAME, **properties)


def create_table(
    catalog: Any,
    identifier: str,
    schema: pa.Schema | Any,
    tables: Sequence[pa.Table] = (),
    **kwargs: Any,
):
    """A table with one data file per non-empty table in ``tables`` (one append each)."""
    table = catalog.create_table(identifier, schema=schema, **kwargs)
    for t in tables:
        if t.num_rows:
            table.append(t.cast(table.schema().as_arrow()))
    return table


def scan(table: Any, snapshot_id: int | None = None) -> pa.Table:
    """Every row of the current snapshot (or ``snapshot_id``), through pyiceberg's reader."""
    return table.scan(snapshot_id=snapshot_id).to_arrow()


def local_files(root: str | Path) -> set[str]:
    """Every file under ``root``, as absolute paths."""
    root = Path(root)
    return {str(p) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def check_metadata_complete(table: Any) -> None:
    """No dangling metadata: the current metadata file, every snapshot's manifest list, its
    manifests and their live data files exist, and the current snapshot scans."""
    import pyarrow.fs as pafs

    from memsafe_dagster.datasets.iceberg.storage import TableStorage

    storage = TableStorage(table)

    def exists(uri: str) -> bool:
        return storage.afs.get_file_info(storage.path(uri)).type == pafs.FileType.File

    missing = [] if exists(table.metadata_location) else [table.metadata_location]
    for snapshot in table.metadata.snapshots:
        if not exists(snapshot.manifest_list):
            missing.append(snapshot.manifest_list)
            continue
        for manifest in snapshot.manifests(table.io):
            if not exists(manifest.manifest_path):
                missing.append(manifest.manifest_path)
                continue
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                if not exists(entry.data_file.file_path):
                    missing.append(entry.data_file.file_path)
    assert not missing, f"dangling references in {table.metadata_location}: {missing}"
    scan(table)


# -- child processes --------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MEMSAFE_MEMORY_LIMIT", None)
    env.pop("CONTAINER_MEMORY_LIMIT", None)
    env.update(extra)
    return env


def merge_argv(
    properties: dict[str, str],
    identifier: str,
    source: str | Path,
    strategy: str,
    keys: Sequence[str],
    **kwargs: Any,
) -> list[str]:
    """argv of a child that merges the Parquet ``source`` into the table and prints JSON."""
    return [
        sys.executable,
        str(HELPER),
        "merge",
        json.dumps(properties),
        identifier,
        str(source),
        strategy,
        ",".join(keys),
        json.dumps(kwargs),
    ]


def start_merge(*args: Any, env: dict[str, str] | None = None, **kwargs: Any):
    """Start a merging child; returns the Popen once it printed READY (imports done)."""
    proc = subprocess.Popen(
        merge_argv(*args, **kwargs),
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
    raw_props, identifier, source, strategy, keys, raw = argv
    kwargs = json.loads(raw)
    sleep_per_progress = kwargs.pop("sleep_per_progress_s", 0.0)
    print_progress = kwargs.pop("print_progress", False)
    import threading
    import time

    from memsafe_dagster.datasets import merge_iceberg

    catalog = load_catalog_from(json.loads(raw_props))
    print("READY", flush=True)

    lock = threading.Lock()

    def progress(done: int, total: int) -> None:
        if print_progress:
            with lock:
                print("PROGRESS", flush=True)
        if sleep_per_progress:
            time.sleep(sleep_per_progress)

    result = merge_iceberg(
        source,
        identifier,
        strategy,
        keys.split(","),
        catalog=catalog,
        merge_progress_callback=progress,
        **kwargs,
    )
    print(json.dumps(result.to_dict(), default=str), flush=True)
    return 0


def _child_merges(argv: list[str]) -> int:
    """Merge each ``[source, strategy]`` of a JSON list, one after the other."""
    raw_props, identifier, keys, raw_steps, raw = argv
    kwargs = json.loads(raw)
    from memsafe_dagster.datasets import merge_iceberg

    catalog = load_catalog_from(json.loads(raw_props))
    print("READY", flush=True)
    for source, strategy in json.loads(raw_steps):
        result = merge_iceberg(
            source, identifier, strategy, keys.split(","), catalog=catalog, **kwargs
        )
        print(json.dumps({"source": source, **result.to_dict()}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "merge":
        sys.exit(_child_merge(rest))
    if command == "merges":
        sys.exit(_child_merges(rest))
    raise SystemExit(f"unknown command {command!r}")
