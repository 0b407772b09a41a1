"""Where an Iceberg table's files live: one PyArrow filesystem and its paths for the merge.

The merge engine reads and writes files through a PyArrow filesystem and plain paths, while
Iceberg metadata holds URIs (``s3://bucket/key``, ``file:///dir/file``). ``TableStorage`` maps
between them with the table's own FileIO configuration (endpoint, credentials, region), so the
merge reaches exactly the storage pyiceberg does: natively for ``PyArrowFileIO``, through
fsspec for ``FsspecFileIO``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from memsafe_dagster.datasets.filesystem import arrow_filesystem

if TYPE_CHECKING:
    from pyiceberg.table import Table


def scheme_of(uri: str) -> str:
    """The URI's scheme; a plain path is ``file``."""
    scheme = urlparse(uri).scheme
    return "file" if len(scheme) <= 1 else scheme  # "C:\\..." is a path, not a scheme


class TableStorage:
    """The table location's filesystem (``afs``, and ``fs`` as fsspec) and path mapping."""

    def __init__(self, table: Table) -> None:
        from pyiceberg.io.fsspec import FsspecFileIO
        from pyiceberg.io.pyarrow import PyArrowFileIO

        io = table.io
        self.location = table.location().rstrip("/")
        self.scheme = scheme_of(self.location)
        if isinstance(io, PyArrowFileIO):
            _, netloc, _ = io.parse_location(self.location, io.properties)
            self.afs: pafs.FileSystem = io.fs_by_scheme(self.scheme, netloc)
            self._strip = lambda uri: io.parse_location(uri, io.properties)[2]
            self.fs: fsspec.AbstractFileSystem = (
                LocalFileSystem() if isinstance(self.afs, pafs.LocalFileSystem) else _wrap(self.afs)
            )
        elif isinstance(io, FsspecFileIO):
            fs = io.get_fs(self.scheme)
            self.fs = fs
            self.afs = arrow_filesystem(fs)
            self._strip = fs._strip_protocol
        else:
            raise ValueError(
                f"the table's FileIO {type(io).__name__} is not supported: memsafe reads and "
                "writes Iceberg data files through PyArrowFileIO or FsspecFileIO (set the "
                "catalog property py-io-impl to one of them)"
            )

    def path(self, uri: str) -> str:
        """The filesystem path of a file URI of this table; ValueError for another scheme."""
        if scheme_of(uri) != self.scheme:
            raise ValueError(
                f"data file {uri} is not on the table location's filesystem ({self.location}); "
                "memsafe merges tables whose files share one storage scheme"
            )
        return self._strip(uri)


def _wrap(afs: pafs.FileSystem) -> fsspec.AbstractFileSystem:
    from fsspec.implementations.arrow import ArrowFSWrapper

    return ArrowFSWrapper(afs)
