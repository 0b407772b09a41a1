"""NumPy <-> Arrow for hot paths (key codes, row selection), zero-copy, without ``pa.array``.

``pa.array``, ``to_numpy`` and ``pa.scalar`` import pandas on first use when it is installed,
which costs more memory than a small merge budget can spare. Building arrays from buffers, as
everything here does, never touches it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_ARROW_TYPES = {
    np.dtype(np.int64): pa.int64(),
    np.dtype(np.uint64): pa.uint64(),
    np.dtype(np.int32): pa.int32(),
    np.dtype(np.uint32): pa.uint32(),
}


def from_numpy(values: np.ndarray) -> pa.Array:
    """An Arrow array over ``values`` (int32/int64/uint32/uint64, or bool), without copying
    integers."""
    if values.dtype == np.bool_:
        bits = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])
    values = np.ascontiguousarray(values)
    arrow_type = _ARROW_TYPES.get(values.dtype)
    if arrow_type is None:
        values = values.astype(np.int64)
        arrow_type = pa.int64()
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(values)])


def indices(values: np.ndarray) -> pa.Array:
    """Row indices for ``take`` (int64)."""
    return from_numpy(values.astype(np.int64, copy=False))


def take_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table``'s rows at ``rows`` (in range by construction, so not bounds-checked again)."""
    return pc.take(table, indices(rows), boundscheck=False)


def fixed_values(array: pa.Array, dtype: np.dtype | type) -> np.ndarray:
    """The values buffer of a fixed-width array as NumPy (read-only view; nulls hold junk)."""
    dtype = np.dtype(dtype)
    buf = array.buffers()[1]
    if buf is None:
        return np.zeros(len(array), dtype=dtype)
    return np.frombuffer(buf, dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def validity(array: pa.Array) -> np.ndarray | None:
    """True where ``array`` is not null, or None when it has no nulls."""
    if array.null_count == 0:
        return None
    if pa.types.is_null(array.type):
        return np.zeros(len(array), dtype=bool)
    bitmap = array.buffers()[0]
    return _bits(bitmap, array.offset, len(array))


def bools(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow array as NumPy bools (null is False)."""
    if isinstance(array, pa.ChunkedArray):
        if array.num_chunks == 0:
            return np.zeros(0, dtype=bool)
        return np.concatenate([bools(c) for c in array.chunks])
    values = _bits(array.buffers()[1], array.offset, len(array))
    valid = validity(array)
    return values if valid is None else values & valid


def _bits(buffer: pa.Buffer | None, offset: int, n: int) -> np.ndarray:
    if buffer is None:
        return np.ones(n, dtype=bool)
    raw = np.frombuffer(buffer, dtype=np.uint8)
    lo = offset >> 3
    hi = (offset + n + 7) >> 3
    bits = np.unpackbits(raw[lo:hi], bitorder="little").astype(bool)
    skip = offset - (lo << 3)
    return bits[skip : skip + n]
