"""The merge's source: any tabular input, opened the way the merge reads it.

A thin adapter over ``datasets.source``: a path is read as its Parquet files, the schema is
known before the target is locked (a bad first item of an iterable fails first), and a
dataset's row count is taken from its metadata, because the merge plans its memory with it.

Which filesystem a path is read from: a plain path is on the target's filesystem; a URL of the
target filesystem's protocol is read through that filesystem too (so an ``s3://`` source uses
the endpoint and credentials the target was opened with, not a default AWS session); a URL of
another protocol gets its own filesystem, built with the merge's ``storage_options``. Data
that carries its filesystem (a ``pyarrow.dataset.Dataset``, a stream) keeps it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec

from memsafe_dagster.datasets.filesystem import protocols
from memsafe_dagster.datasets.source import TabularSource, tabular_source


def open_source(
    data: object,
    *,
    chunk_rows: int,
    filesystem: fsspec.AbstractFileSystem | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> TabularSource:
    """``data`` as a ``TabularSource`` for the merge; an iterable is re-chunked to
    ``chunk_rows`` rows before the merge's own chunk size applies. ``filesystem`` is the
    target's (see the module docstring for which paths it reads)."""
    filesystem = source_filesystem(data, filesystem)
    source = tabular_source(
        data,
        filesystem=filesystem,
        storage_options=dict(storage_options) if storage_options else None,
        chunk_rows=chunk_rows,
        what="merge source",
    )
    _ = source.schema  # an iterable's first item is read now, before the target is locked
    source.count_rows()  # a dataset's rows, from its metadata
    return source


def source_filesystem(
    data: object, target_fs: fsspec.AbstractFileSystem | None
) -> fsspec.AbstractFileSystem | None:
    """The filesystem a path source is read through: the target's, unless it is a URL of
    another protocol (None: it resolves by its own URL)."""
    if target_fs is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        paths: Sequence[Any] = [data]
    elif (
        isinstance(data, Sequence) and data and all(isinstance(p, (str, os.PathLike)) for p in data)
    ):
        paths = data
    else:
        return target_fs
    wanted = {fsspec.core.split_protocol(os.fspath(p))[0] for p in paths}
    own = protocols(target_fs)
    if all(p is None or p in own for p in wanted):
        return target_fs
    return None
