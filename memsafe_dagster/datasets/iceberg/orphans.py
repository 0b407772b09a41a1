"""Orphan files: written for an Iceberg table but referenced by none of its metadata.

A merge deletes its data files when it fails or is stopped before the commit, and pyiceberg
deletes its manifests when a commit is refused. A process killed (``kill -9``, the OOM killer)
between writing and committing cannot: its data files, manifests and metadata file stay
behind, unreferenced. They are invisible to every reader (Iceberg reads only what the metadata
lists) and cost only storage. pyiceberg (0.12) has no orphan-file cleanup, so
``remove_orphan_files`` is memsafe's: it lists the table's data and metadata locations and
deletes every file no snapshot, manifest or metadata log entry references and that is older
than a grace period (default three days, as Iceberg's own Java action), so files of a writer
still at work are never touched.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from memsafe_dagster.datasets.iceberg.catalog import resolve_table
from memsafe_dagster.datasets.iceberg.storage import TableStorage

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

DEFAULT_GRACE = dt.timedelta(days=3)


def referenced_files(table: Table) -> set[str]:
    """Every file URI the table's metadata references: metadata files (current and logged),
    manifest lists, manifests, data and delete files of every snapshot, statistics files."""
    metadata = table.metadata
    out = {table.metadata_location}
    out.update(entry.metadata_file for entry in metadata.metadata_log)
    out.update(s.statistics_path for s in metadata.statistics)
    out.update(s.statistics_path for s in metadata.partition_statistics)
    seen: set[str] = set()
    for snapshot in metadata.snapshots:
        out.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(table.io):
            if manifest.manifest_path in seen:
                continue
            seen.add(manifest.manifest_path)
            out.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=False):
                out.add(entry.data_file.file_path)
    return out


def remove_orphan_files(
    table: Table | str | Sequence[str],
    *,
    catalog: Catalog | str | None = None,
    older_than: dt.timedelta = DEFAULT_GRACE,
    dry_run: bool = False,
) -> list[str]:
    """Delete the table's unreferenced files older than ``older_than``; returns their paths
    (with ``dry_run``, only lists them)."""
    if not isinstance(older_than, dt.timedelta) or older_than < dt.timedelta(0):
        raise ValueError(f"older_than must be a non-negative timedelta, got {older_than!r}")
    table = resolve_table(table, catalog)
    table.refresh()
    storage = TableStorage(table)
    referenced = {storage.path(uri) for uri in referenced_files(table) if uri}
    provider = table.location_provider()
    cutoff = time.time() - older_than.total_seconds()
    removed: list[str] = []
    roots = dict.fromkeys(storage.path(p) for p in (provider.data_path, provider.metadata_path))
    for root in roots:
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        for info in storage.afs.get_file_info(selector):
            if info.type != pafs.FileType.File or info.path in referenced:
                continue
            mtime = _modified(storage, info)
            if mtime is None or mtime > cutoff:
                continue  # of unknown age, or too young: possibly a writer at work
            removed.append(info.path)
            if not dry_run:
                storage.afs.delete_file(info.path)
    return sorted(removed)


def _modified(storage: TableStorage, info: pafs.FileInfo) -> float | None:
    """When the file was last written (seconds since the epoch), or None when unknown."""
    if info.mtime is not None:
        return info.mtime.timestamp()
    try:  # fsspec filesystems wrapped for PyArrow do not report it in the listing
        return storage.fs.modified(info.path).timestamp()
    except (NotImplementedError, OSError, AttributeError, KeyError, ValueError):
        return None
