"""Paths are URLs and a filesystem is a parameter: resolve both into (fsspec fs, plain path).

PyArrow gets the fast native local filesystem for local paths and a wrapped fsspec filesystem
for everything else (``memory://``, ``s3://``, ...).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

PathLike = str | os.PathLike[str]


def resolve_filesystem(
    path: PathLike,
    filesystem: fsspec.AbstractFileSystem | pafs.FileSystem | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path stripped of its protocol.

    An explicit ``filesystem`` wins (a PyArrow one is wrapped); otherwise the URL's protocol
    picks it, with ``storage_options`` passed through (credentials, endpoints).
    """
    raw = os.fspath(path)
    if filesystem is not None:
        fs = _as_fsspec(filesystem)
        return fs, fs._strip_protocol(raw)
    fs, stripped = fsspec.core.url_to_fs(raw, **dict(storage_options or {}))
    return fs, stripped


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """A PyArrow filesystem for ``fs``: native for local disks (much faster), wrapped otherwise."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    from fsspec.implementations.arrow import ArrowFSWrapper

    if isinstance(fs, ArrowFSWrapper):
        return fs.fs
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', as every fsspec filesystem expects."""
    return posixpath.join(base.rstrip("/") or "/", *(p.strip("/") for p in parts))


def is_hidden(relative_path: str) -> bool:
    """True when any component starts with '_' or '.', the prefixes every reader skips."""
    return any(part.startswith(("_", ".")) for part in relative_path.split("/") if part)


def list_data_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Sorted data files under ``path`` (recursively), skipping hidden paths as PyArrow does.

    ``path`` may also be a single file. A missing path is an empty dataset. This is a plain
    listing: a reader that must not see a commit half-done uses ``snapshot.snapshot``.
    """
    return sorted(data_file_infos(fs, path))


def data_file_infos(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict[str, Any]]:
    """``list_data_files`` with each file's listing entry (size, mtime, inode or ETag)."""
    if not fs.exists(path):
        return {}
    if fs.isfile(path):
        return {path: {"name": path}}
    base = path.rstrip("/")
    fs.invalidate_cache(base)
    files = {}
    for found, info in fs.find(base, detail=True).items():
        relative = found[len(base) :].lstrip("/") if found.startswith(base) else found
        if not is_hidden(relative) and info.get("type", "file") != "directory":
            files[found] = info
    return files


def _as_fsspec(
    filesystem: fsspec.AbstractFileSystem | pafs.FileSystem,
) -> fsspec.AbstractFileSystem:
    if isinstance(filesystem, fsspec.AbstractFileSystem):
        return filesystem
    if isinstance(filesystem, pafs.LocalFileSystem):
        return LocalFileSystem()
    if isinstance(filesystem, pafs.FileSystem):
        from fsspec.implementations.arrow import ArrowFSWrapper

        return ArrowFSWrapper(filesystem)
    raise TypeError(
        f"filesystem must be an fsspec or pyarrow filesystem, got {type(filesystem).__name__}"
    )
