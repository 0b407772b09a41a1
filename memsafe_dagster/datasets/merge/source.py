"""The merge's source: any tabular input, opened the way the merge reads it.

A thin adapter over ``datasets.source``: a path is read as its Parquet files (a URL names its
own filesystem, a plain path is on the target's), the schema is known before the target is
locked (a bad first item of an iterable fails first), and a dataset's row count is taken from
its metadata, because the merge plans its memory with it.
"""

from __future__ import annotations

import os

import fsspec

from memsafe_dagster.datasets.source import TabularSource, tabular_source


def open_source(
    data: object,
    *,
    chunk_rows: int,
    filesystem: fsspec.AbstractFileSystem | None = None,
    storage_options: dict | None = None,
) -> TabularSource:
    """``data`` as a ``TabularSource`` for the merge; an iterable is re-chunked to
    ``chunk_rows`` rows before the merge's own chunk size applies."""
    if filesystem is not None and isinstance(data, (str, os.PathLike)) and "://" in os.fspath(data):
        filesystem = None
    source = tabular_source(
        data,
        filesystem=filesystem,
        storage_options=storage_options,
        chunk_rows=chunk_rows,
        what="merge source",
    )
    _ = source.schema  # an iterable's first item is read now, before the target is locked
    source.count_rows()  # a dataset's rows, from its metadata
    return source
