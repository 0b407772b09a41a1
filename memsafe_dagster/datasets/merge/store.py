"""Where a merge reads its target from and commits to: a ``MergeTarget``.

The engine is the same for every kind of target; what differs is behind two small protocols:

- ``MergeTarget``: names the target, refuses what cannot be one, and opens a ``TargetWrite``
  (a context manager: leaving it without ``commit`` discards everything staged);
- ``TargetWrite``: the target's files as the merge sees them (``load``, footers only), staging
  paths for new files (``new_file``), the files to drop (``remove``) and the one atomic
  ``commit``.

``ParquetTarget`` is a Parquet dataset directory on any fsspec filesystem, committed through
``commit.DatasetTransaction``. Table formats (Iceberg) provide their own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import fsspec
import pyarrow.fs as pafs

from memsafe_dagster.datasets.commit import DatasetTransaction
from memsafe_dagster.datasets.filesystem import arrow_filesystem, is_local, join
from memsafe_dagster.datasets.merge.options import MergeOptions
from memsafe_dagster.datasets.merge.target import TargetDataset, load_target
from memsafe_dagster.datasets.snapshot import base_files


class TargetWrite(Protocol):
    """One merge's write into its target (see the module docstring)."""

    txn: str
    spill_base: str | None

    def load(self, keys: Sequence[str]) -> TargetDataset: ...

    def new_file(self, relative_path: str) -> str: ...

    def remove(self, path: str) -> None: ...

    def commit(self, info: dict[str, Any]) -> None: ...


class MergeTarget(Protocol):
    """A merge target: its filesystems, a readable name, and how to write into it."""

    fs: fsspec.AbstractFileSystem
    afs: pafs.FileSystem
    name: str

    def check(self) -> None: ...

    def open(
        self, operation: str, options: MergeOptions
    ) -> contextlib.AbstractContextManager[TargetWrite]: ...


class ParquetTarget:
    """A Parquet dataset directory at ``path`` on ``fs`` (it may not exist yet)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.afs = arrow_filesystem(fs)
        self.path = path.rstrip("/") or "/"
        self.name = self.path

    def check(self) -> None:
        if self.fs.isfile(self.path):
            raise ValueError(
                f"target {self.path!r} is a file; a merge target is a dataset directory "
                "(it may not exist yet)"
            )

    @contextlib.contextmanager
    def open(self, operation: str, options: MergeOptions) -> Iterator[TargetWrite]:
        existed = self.fs.exists(self.path)
        write: _ParquetWrite | None = None
        try:
            with DatasetTransaction(
                self.fs,
                self.path,
                operation=operation,
                lock_timeout_s=options.lock_timeout_s,
                durable=options.durable,
            ) as txn:
                write = _ParquetWrite(self, txn)
                yield write
        finally:
            if not existed and (write is None or not write.committed):
                _remove_empty_tree(self.fs, self.path)


class _ParquetWrite:
    """A ``TargetWrite`` on a ``DatasetTransaction``."""

    def __init__(self, target: ParquetTarget, txn: DatasetTransaction) -> None:
        self.target = target
        self.transaction = txn
        self.txn = txn.txn
        self.spill_base = join(txn.staging, "spill") if is_local(target.fs) else None
        self.committed = False

    def load(self, keys: Sequence[str]) -> TargetDataset:
        paths = base_files(self.transaction)
        return load_target(self.target.fs, self.target.afs, self.target.path, keys, paths)

    def new_file(self, relative_path: str) -> str:
        return self.transaction.new_file(relative_path)

    def remove(self, path: str) -> None:
        self.transaction.remove(path)

    def commit(self, info: dict[str, Any]) -> None:
        self.transaction.commit(info=info)
        self.committed = True


def _remove_empty_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove ``path`` if it holds nothing but empty directories (a failed first merge)."""
    with contextlib.suppress(OSError, FileNotFoundError, ValueError):
        if not fs.exists(path):
            return
        if any(True for _ in fs.find(path)):
            return
        if is_local(fs):
            for root, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
                os.rmdir(root)
        else:
            fs.rm(path, recursive=True)
