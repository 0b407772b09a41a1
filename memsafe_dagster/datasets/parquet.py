"""Parquet facts that readers and writers share: the codec names and how reads meet row groups.

``check_compression`` is the one validator of a ``compression`` (and ``compression_level``)
setting, for the writer, the merge and the IO manager alike.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

CODECS = ("none", "snappy", "gzip", "brotli", "lz4", "zstd")
_LEVELLESS = ("none", "snappy", "lz4")


def check_compression(compression: str | None, compression_level: int | None) -> str:
    """The normalised codec name ("uncompressed" and None are "none"), or a ValueError
    naming the bad parameter (also when this PyArrow build lacks the codec)."""
    codec = "none" if compression is None else compression
    if not isinstance(codec, str) or codec.lower() not in (*CODECS, "uncompressed"):
        raise ValueError(f"compression must be one of {', '.join(CODECS)} or None, got {codec!r}")
    codec = "none" if codec.lower() == "uncompressed" else codec.lower()
    if codec != "none" and not pa.Codec.is_available(codec):
        raise ValueError(f"compression {codec!r} is not available in this PyArrow build")
    if compression_level is not None:
        if isinstance(compression_level, bool) or not isinstance(compression_level, int):
            raise ValueError(f"compression_level must be an integer, got {compression_level!r}")
        if codec in _LEVELLESS:
            raise ValueError(f"compression {codec!r} takes no compression_level")
        try:
            pa.Codec(codec, compression_level=compression_level)
        except (ValueError, pa.ArrowInvalid) as exc:
            raise ValueError(f"compression_level {compression_level} for {codec}: {exc}") from None
    return codec


def aligned_batch_rows(metadata: pq.FileMetaData, chunk_rows: int) -> int:
    """Read whole row groups when they are about the chunk size (up to twice it): a batch
    that spans two row groups costs the reader a concatenation; otherwise read chunks."""
    if metadata.num_row_groups == 0:
        return chunk_rows
    largest = max(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    return largest if chunk_rows <= largest <= 2 * chunk_rows else chunk_rows
