"""A scratch directory on one fsspec filesystem (local or memory://), for IO and writer tests."""

from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class Where:
    """``where("x")`` is the URL the code under test gets; ``p("x")`` the path checks use."""

    fs: fsspec.AbstractFileSystem
    path: str
    url: str

    def __call__(self, name: str) -> str:
        return f"{self.url}/{name}"

    def p(self, name: str) -> str:
        return f"{self.path}/{name}"

    def listing(self, name: str = "") -> list[str]:
        """Every file below ``name``, relative to it."""
        base = self.p(name).rstrip("/")
        if not self.fs.exists(base):
            return []
        return sorted(f[len(base) :].lstrip("/") for f in self.fs.find(base))

    def data_files(self, name: str) -> list[str]:
        """The files below ``name`` that are not hidden (``_`` or ``.`` prefixed)."""
        return [f for f in self.listing(name) if not f.startswith(("_", "."))]

    def snapshot(self, name: str) -> dict[str, bytes]:
        return {f: self.fs.cat_file(f) for f in self.fs.find(self.p(name))}

    def read(self, name: str) -> pa.Table:
        with self.fs.open(self.p(name), "rb") as fh:
            return pq.read_table(fh)

    def row_groups(self, name: str) -> list[int]:
        with self.fs.open(self.p(name), "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
