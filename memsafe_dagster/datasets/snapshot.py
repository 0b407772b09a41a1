"""Snapshot reads: a reader sees a dataset exactly as before or after a concurrent commit.

A commit (``commit.py``) publishes by creating the log entry ``_memsafe/log/<version>.json``
and then applies: staged files move to their final names, replaced files move to
``_memsafe/trash/<version>/<relative path>``. A plain listing taken meanwhile can hold old and
new files at once, and a file listed can be gone before it is opened. The protocol here needs
no lock and no write access:

1. **Consistent listing.** Read the latest log version V1, the pending commit records, the
   data files, then the latest version V2. When V1 == V2 no commit point passed during the
   listing, so it is the state of version V1 unless the commit of V1 is still being applied
   (its record exists, its log entry names its txn): that record is folded in, files
   = listing + its final adds - its removes, so a writer mid-apply (or killed mid-apply) reads
   as after. A record whose log entry is missing or names another txn never committed and is
   ignored. When V1 != V2 the listing is retried with a short backoff, for ``timeout_s`` at
   most, then ``SnapshotError``. A path without ``_memsafe`` state (files written by pandas or
   Spark) is version 0 and listed as is; a single file is just that file.
2. **Stable files.** Each file is opened where the snapshot's version of it is now: the staging
   path of a folded add not yet moved, the final path while it still holds the same file (same
   inode on local disks, same ETag on object stores; without either, no trash entry newer than
   the snapshot may name it), else the trash of the first commit after the snapshot that holds
   it (that commit removed or replaced it). ``snapshot_filesystem`` is a PyArrow filesystem
   that does this on open and delegates everything else to the native filesystem, so reads
   stay native on local disks. On object stores an open file whose key is moved or replaced
   mid-read (404, or 412 from s3fs's ETag pinning) is reopened at its new place and the read
   continues at the same offset; on local disks an open file survives the rename.

Trash is kept for ``MEMSAFE_SNAPSHOT_RETENTION_S`` (default one hour, see ``commit``): a reader
holding a snapshot longer than that may find a removed file gone, and gets a
``FileNotFoundError`` that says so.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs

from memsafe_dagster.datasets import commit
from memsafe_dagster.datasets.filesystem import (
    arrow_filesystem,
    directory_file_infos,
    is_hidden,
    is_local,
    join,
)
from memsafe_dagster.datasets.python_files import python_file

if TYPE_CHECKING:
    import pyarrow.dataset as ds  # imported where used: it loads pandas when installed

SNAPSHOT_TIMEOUT_S = 5.0


class SnapshotError(RuntimeError):
    """No consistent listing of a dataset could be taken (it kept changing)."""


@dataclass(frozen=True)
class SnapshotFile:
    """One file of a snapshot: its path, and where else its content may be now."""

    path: str
    root: str
    relative: str
    version: int
    identity: Any = None
    staged: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """The data files of the dataset at ``path`` as of log ``version`` (0: no memsafe log)."""

    fs: fsspec.AbstractFileSystem
    path: str
    version: int
    files: tuple[str, ...]
    entries: dict[str, SnapshotFile] = field(default_factory=dict, repr=False)
    attempts: int = 1
    kind: str = "directory"  # or "file" (just that file) or "missing" (no files)

    def arrow_filesystem(self) -> pafs.FileSystem:
        """A PyArrow filesystem that opens this snapshot's files (``snapshot_filesystem``)."""
        return snapshot_filesystem(self.fs, [self])


def as_dataset(
    snapshots: Sequence[Snapshot], *, format: str = "parquet", partitioning: Any = None
) -> ds.Dataset:
    """The files of ``snapshots`` (of one filesystem) as one ``pyarrow.dataset.Dataset`` that
    opens each where it is now; ``partitioning`` is relative to a single snapshot's root."""
    import pyarrow.dataset as ds

    if not snapshots:
        return ds.dataset([], format=format)  # nothing to read (every partition missing)
    files = [f for snap in snapshots for f in snap.files]
    base = snapshots[0].path if partitioning is not None and len(snapshots) == 1 else None
    return ds.dataset(
        files,
        filesystem=snapshot_filesystem(snapshots[0].fs, snapshots),
        format=format,
        partitioning=partitioning,
        partition_base_dir=base,
    )


def snapshot(
    fs: fsspec.AbstractFileSystem, path: str, *, timeout_s: float = SNAPSHOT_TIMEOUT_S
) -> Snapshot:
    """A consistent listing of the dataset (or single file) at ``path`` (module docstring)."""
    path = path.rstrip("/") or path
    if not fs.exists(path):
        return Snapshot(fs, path, 0, (), kind="missing")
    if fs.isfile(path):
        return Snapshot(fs, path, 0, (path,), kind="file")
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    attempts = 0
    seen: list[int] = []
    while True:
        attempts += 1
        v1 = commit.latest_version(fs, path)
        records = _committed_records(fs, path, v1)
        infos = directory_file_infos(fs, path)
        v2 = commit.latest_version(fs, path)
        if v1 == v2:
            return _build(fs, path, v1, records, infos, attempts)
        seen += [v1, v2]
        if time.monotonic() + delay > deadline:
            raise SnapshotError(
                f"dataset {path}: no consistent listing in {timeout_s:.1f}s ({attempts} tries, "
                f"versions {min(seen)}..{max(seen)}): commits kept landing while it was listed. "
                "Retry the read; a writer committing many times a second starves readers."
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def base_files(txn: commit.DatasetTransaction) -> list[str]:
    """The data files of the version ``txn`` read when it took the lock (its base), for a
    writer to plan on: ``CommitConflictError`` when another writer's commit landed since, or
    is still being applied (a lock lost or broken mid-commit), so a plan never rests on a
    listing of another version (the fence alone checks only the version, not the listing)."""
    snap = snapshot(txn.fs, txn.target)
    pending = any(entry.staged is not None for entry in snap.entries.values())
    if snap.version != txn.base_version or pending:
        raise commit.CommitConflictError(
            f"dataset {txn.target}: another writer's commit (version {snap.version}) landed "
            f"while this {txn.operation} started on version {txn.base_version}"
            f"{' and is still being applied' if pending else ''}; nothing was changed. Run it "
            "again: it will see the other writer's rows."
        )
    return list(snap.files)


def snapshot_filesystem(
    fs: fsspec.AbstractFileSystem, snapshots: Sequence[Snapshot]
) -> pafs.FileSystem:
    """A PyArrow filesystem over ``fs`` that opens every snapshot file where it is now.

    Without any directory snapshot it is just ``arrow_filesystem(fs)``.
    """
    base = arrow_filesystem(fs)
    entries: dict[str, SnapshotFile] = {}
    for snap in snapshots:
        entries.update(snap.entries)
    if not entries:
        return base
    return pafs.PyFileSystem(SnapshotHandler(base, fs, entries))


def is_local_arrow(filesystem: object) -> bool:
    """True for PyArrow's native local filesystem, also behind a snapshot filesystem."""
    if isinstance(filesystem, pafs.PyFileSystem) and isinstance(
        filesystem.handler, SnapshotHandler
    ):
        filesystem = filesystem.handler.base
    return isinstance(filesystem, pafs.LocalFileSystem)


# -- the consistent listing ---------------------------------------------------------------------


def _committed_records(
    fs: fsspec.AbstractFileSystem, target: str, version: int
) -> list[commit.CommitRecord]:
    """Records of the commit of ``version`` if it is not fully applied yet (its log entry names
    it), plus legacy records without a version (rolled forward by recovery). An older record
    is never pending: the writer of any later version recovered it before committing."""
    directory = join(target, commit.STATE_DIR, "commits")
    fs.invalidate_cache(directory)
    try:
        names = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    records = []
    for name in sorted(names):
        if not name.endswith(".json"):
            continue
        try:
            record = commit.CommitRecord.from_json(fs.cat_file(name), name)
        except FileNotFoundError:
            continue  # applied and deleted since the listing: the data listing shows it
        if record.log_version is None:
            records.append(record)
        elif record.log_version == version:
            entry = commit.log_entry(fs, target, record.log_version)
            if entry.get("txn") == record.txn:
                records.append(record)
    return records


def _build(
    fs: fsspec.AbstractFileSystem,
    root: str,
    version: int,
    records: list[commit.CommitRecord],
    infos: dict[str, dict[str, Any]],
    attempts: int,
) -> Snapshot:
    local = is_local(fs)
    entries = {
        path: SnapshotFile(path, root, _relative(root, path), version, _identity(info, local))
        for path, info in infos.items()
    }
    for record in records:
        for staged_rel, final_rel in record.add:
            if is_hidden(final_rel):
                continue
            final = join(root, final_rel)
            # The content is the staged file until it moves; which file the final name holds
            # is then unknown here (no identity), so the trash is consulted.
            entries[final] = SnapshotFile(
                final, root, final_rel, version, None, join(root, staged_rel)
            )
        added = {final_rel for _, final_rel in record.add}
        for removed in record.remove:
            if removed not in added:
                entries.pop(join(root, removed), None)
    files = tuple(sorted(entries))
    return Snapshot(fs, root, version, files, entries, attempts)


def _relative(root: str, path: str) -> str:
    return path[len(root) :].lstrip("/") if path.startswith(root) else path


def _identity(info: dict[str, Any], local: bool) -> Any:
    if local:
        return info.get("ino")
    for key in ("ETag", "etag", "generation"):
        if info.get(key):
            return info[key]
    return None


# -- opening files where they are now -----------------------------------------------------------


class SnapshotHandler(pafs.FileSystemHandler):
    """Delegates to ``base``; opens snapshot files at their final, staging or trash path."""

    def __init__(
        self,
        base: pafs.FileSystem,
        fs: fsspec.AbstractFileSystem,
        entries: dict[str, SnapshotFile],
    ) -> None:
        self.base = base
        self.fs = fs
        self.entries = entries
        self.local = is_local(fs)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SnapshotHandler)
            and other.base.equals(self.base)
            and other.entries == self.entries
        )

    def equals(self, other: object) -> bool:
        return self == other

    def get_type_name(self) -> str:
        return "memsafe-snapshot+" + self.base.type_name

    def normalize_path(self, path: str) -> str:
        return self.base.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        infos = self.base.get_file_info(paths)
        out = []
        for path, info in zip(paths, infos, strict=True):
            entry = self.entries.get(path)
            if entry is not None:
                where = self._locate(entry)
                if where is not None and where != path:
                    found = self.base.get_file_info([where])[0]
                    info = pafs.FileInfo(path, found.type, mtime=found.mtime, size=found.size)
            out.append(info)
        return out

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.base.get_file_info(selector)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._open(path)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._open(path)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.base.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.base.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self.base.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.base.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.base.copy_file(src, dest)

    def open_output_stream(self, path: str, metadata: dict[str, str]) -> pa.NativeFile:
        return self.base.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict[str, str]) -> pa.NativeFile:
        return self.base.open_append_stream(path, metadata=metadata)

    # -- resolution -------------------------------------------------------------------------

    def _open(self, path: str) -> pa.NativeFile:
        entry = self.entries.get(path)
        if entry is None:
            return self.base.open_input_file(path)
        handle, where = self._open_entry(entry)
        if self.local:
            return handle  # an open file survives the rename to the trash
        return python_file(_Reopening(self, entry, handle, where), mode="r")

    def _open_entry(self, entry: SnapshotFile) -> tuple[pa.NativeFile, str]:
        for _ in range(3):  # a file may move between two of the places tried: try again
            replaced_final = None
            for where in self._places(entry):
                try:
                    handle = self.base.open_input_file(where)
                except FileNotFoundError:
                    continue
                if where == entry.path and not self._still_holds(entry):
                    # The name holds another file now: the snapshot's is in the trash (unless
                    # an outside writer replaced it in place: then this is all there is).
                    handle.close()
                    replaced_final = where
                    continue
                return handle, where
            if replaced_final is not None:
                return self.base.open_input_file(replaced_final), replaced_final
        raise FileNotFoundError(
            f"{entry.path}: this file of the dataset {entry.root} (read as of version "
            f"{entry.version}) is gone from its path and from the trash: a later commit removed "
            f"it and the trash is kept for {commit.RETENTION_ENV}={commit.retention_s():.0f}s"
        )

    def _locate(self, entry: SnapshotFile) -> str | None:
        with contextlib.suppress(FileNotFoundError):
            handle, where = self._open_entry(entry)
            handle.close()
            return where
        return None

    def _places(self, entry: SnapshotFile) -> Iterator[str]:
        if entry.staged is not None:
            yield entry.staged
        yield entry.path
        for version in self._trash_versions(entry):
            yield commit.trash_path(entry.root, version, entry.relative)

    def _trash_versions(self, entry: SnapshotFile) -> list[int]:
        directory = join(entry.root, commit.STATE_DIR, commit.TRASH_DIR)
        if self.local:
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                return []
            versions = [int(n) for n in names if n.isdigit()]
        else:
            versions = list(commit.versioned(self.fs, directory, detail=False))
        later = sorted(v for v in versions if v > entry.version)
        return later + ([0] if 0 in versions and entry.version > 0 else [])

    def _still_holds(self, entry: SnapshotFile) -> bool:
        """True when the final path still holds the snapshot's file (checked after opening)."""
        if entry.identity is not None:
            try:
                if self.local:
                    return os.stat(entry.path).st_ino == entry.identity
                self.fs.invalidate_cache(entry.path)
                return _identity(self.fs.info(entry.path), False) == entry.identity
            except FileNotFoundError:
                return False
        for version in self._trash_versions(entry):
            if self.fs.exists(commit.trash_path(entry.root, version, entry.relative)):
                return False
        return True


class _Reopening:
    """A file on an object store that, when its key is moved or replaced mid-read, reopens the
    snapshot's file where it is now and goes on at the same offset."""

    def __init__(
        self, handler: SnapshotHandler, entry: SnapshotFile, handle: pa.NativeFile, where: str
    ) -> None:
        self.handler, self.entry = handler, entry
        self.handle, self.where = handle, where
        self.closed = False
        self.reopened = 0

    def _retry(self, exc: OSError, offset: int) -> None:
        if self.reopened >= 5:
            raise exc
        try:
            handle, where = self.handler._open_entry(self.entry)
        except FileNotFoundError:
            raise exc from None
        if where == self.where and not isinstance(exc, FileNotFoundError):
            with contextlib.suppress(Exception):
                handle.close()
            raise exc  # still there, the same file: a real I/O error
        with contextlib.suppress(Exception):
            self.handle.close()
        self.handle, self.where = handle, where
        self.handle.seek(offset)
        self.reopened += 1

    def read(self, nbytes: int = -1) -> bytes:
        while True:
            offset = self.handle.tell()
            try:
                if nbytes is None or nbytes < 0:
                    return self.handle.read()
                return self.handle.read(nbytes)
            except OSError as exc:
                self._retry(exc, offset)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def size(self) -> int:
        return self.handle.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.handle.close()
