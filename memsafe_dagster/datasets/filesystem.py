"""Paths are URLs and a filesystem is a parameter: resolve both into (fsspec fs, plain path).

PyArrow gets the fast native local filesystem for local paths and a wrapped fsspec filesystem
for everything else (``memory://``, ``s3://``, ...).

Storage options are read when a filesystem is resolved, not before: a value may be a
``dagster.EnvVar`` (or Dagster's config form ``{"env": "NAME"}``), replaced by the variable's
value each time, so credentials need not live in code, in a definition or in a module global.

Memory on object stores: every open file of an object store buffers blocks in memory (a
writer its multipart part, copied while it uploads; a reader its read-ahead, joined from the
pieces fetched). s3fs's default block is 50 MiB, and a file smaller than a block is buffered
whole, so a few files open at once would take a large share of a small budget.
``resolve_filesystem`` gives S3 ``OBJECT_STORE_BLOCK_SIZE`` blocks and a read-ahead cache of
one block unless the options say otherwise (gcsfs and adlfs blocks are 5 and 4 MiB already),
and ``block_bytes`` tells the merge budget what each open file holds.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from memsafe_dagster.datasets import python_files
from memsafe_dagster.memory.sizes import MiB

PathLike = str | os.PathLike[str]

#: Block size of S3 files unless the storage options set one: a multipart part (S3's minimum
#: is 5 MiB) and the read-ahead of a reader.
OBJECT_STORE_BLOCK_SIZE = 8 * MiB
S3_PROTOCOLS = ("s3", "s3a")
#: s3fs options memsafe sets when the user's options leave them out (the user's always win).
S3_DEFAULTS: dict[str, Any] = {
    "default_block_size": OBJECT_STORE_BLOCK_SIZE,
    "default_cache_type": "readahead",  # one block ahead, replaced as reading moves on
    "default_fill_cache": False,
}


def resolve_filesystem(
    path: PathLike,
    filesystem: fsspec.AbstractFileSystem | pafs.FileSystem | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path stripped of its protocol.

    An explicit ``filesystem`` wins (a PyArrow one is wrapped); otherwise the URL's protocol
    picks it, with ``storage_options`` (credentials, endpoints; environment references read
    now) and, on S3, the bounded buffer defaults the options leave out.
    """
    raw = os.fspath(path)
    if filesystem is not None:
        fs = _as_fsspec(filesystem)
        return fs, fs._strip_protocol(raw)
    protocol = fsspec.core.split_protocol(raw)[0]
    fs, stripped = fsspec.core.url_to_fs(raw, **options_for(protocol, storage_options))
    return fs, stripped


def options_for(protocol: str | None, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` as the filesystem of ``protocol`` is built with: environment
    references read, and on S3 the buffer defaults (``S3_DEFAULTS``) the options leave out."""
    options = resolve_storage_options(storage_options)
    if protocol in S3_PROTOCOLS:
        for name, value in S3_DEFAULTS.items():
            options.setdefault(name, value)
    return options


def resolve_storage_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``storage_options`` with every environment reference (a ``dagster.EnvVar``
    or ``{"env": "NAME"}``, at any depth) replaced by the variable's value.

    A variable that is not set is a ValueError naming it (never its value).
    """
    if not storage_options:
        return {}
    if not isinstance(storage_options, Mapping):
        raise TypeError(f"storage_options must be a mapping, got {type(storage_options).__name__}")
    return {str(k): _resolve_value(v, str(k)) for k, v in storage_options.items()}


def _resolve_value(value: Any, where: str) -> Any:
    name = env_reference(value)
    if name is not None:
        found = os.environ.get(name)
        if found is None:
            raise ValueError(
                f"storage_options[{where!r}] reads the environment variable {name}, "
                "which is not set"
            )
        return int(found) if isinstance(value, int) and not isinstance(value, bool) else found
    if isinstance(value, Mapping):
        return {str(k): _resolve_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_value(v, where) for v in value]
    return value


def env_reference(value: Any) -> str | None:
    """The environment variable a value reads, None for a plain value: a ``dagster.EnvVar``
    or ``EnvVar.int`` (duck-typed: this module does not import Dagster) or Dagster's config
    form ``{"env": "NAME"}``."""
    name = getattr(value, "env_var_name", None)
    if isinstance(name, str) and callable(getattr(value, "get_value", None)):
        return name
    if isinstance(value, Mapping) and len(value) == 1:
        (key, name), *_ = value.items()
        if key == "env" and isinstance(name, str):
            return name
    return None


def block_bytes(fs: fsspec.AbstractFileSystem) -> int:
    """The buffer block of one open file of ``fs`` (0 on a local disk or in memory).

    An object store's writer or reader holds up to about three of them at once (see
    ``merge.budget``).
    """
    if is_local(fs) or "memory" in protocols(fs):
        return 0
    for attribute in ("default_block_size", "blocksize", "block_size"):
        value = getattr(fs, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    """The protocol names ``fs`` answers to (``("s3", "s3a")``, ``("file", "local")``)."""
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """A PyArrow filesystem for ``fs``: native for local disks (much faster), wrapped otherwise."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    from fsspec.implementations.arrow import ArrowFSWrapper

    if isinstance(fs, ArrowFSWrapper):
        return fs.fs
    return python_files.wrap(fs)


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
    return directory_file_infos(fs, path)


def directory_file_infos(
    fs: fsspec.AbstractFileSystem, directory: str
) -> dict[str, dict[str, Any]]:
    """``data_file_infos`` of a path already known to be a directory (no existence checks)."""
    base = directory.rstrip("/")
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
