"""Key codes: every key of a row as one uint64, so keys are compared and hashed in NumPy.

A single integer-like key column (ints, dates, timestamps, times, durations) is *exact*: its
code is the value itself, mapped so that unsigned order equals the key's order (a sorted array
of codes also answers "is any key within [min, max]", which statistics pruning asks). Any other
key (strings, binary, decimals, composite keys) is *hashed* to a 64-bit code: equal keys always
get equal codes, distinct keys almost never do, so whoever matches hashed codes must verify a
match against the key values. Strings are hashed over Arrow's data buffer, never a Python object
per value. Float, nested and null columns cannot be keys (``check_key_type``).

The merge's key index (``merge.index``) and the bounded-memory uniqueness check both build on
this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from memsafe_dagster.datasets.arrays import bools, fixed_values, validity
from memsafe_dagster.datasets.schema import type_kind


def key_value_type(t: pa.DataType) -> pa.DataType:
    """The type keys are compared in (dictionary keys by their values)."""
    return t.value_type if pa.types.is_dictionary(t) else t


def check_key_type(column: str, t: pa.DataType, side: str) -> None:
    """Refuse types that cannot identify a row exactly (floats, nested, null); ``side`` is
    "source" or "target", for the message."""
    kind = type_kind(t)
    if pa.types.is_floating(key_value_type(t)):
        raise ValueError(
            f"key column {column!r} of the {side} is floating point ({t}): float keys cannot be "
            "matched exactly; use an integer, decimal or string key"
        )
    if kind in ("list", "struct", "map", "null") or kind.startswith("other:"):
        raise ValueError(f"key column {column!r} of the {side} has type {t}, which cannot be a key")


SIGN = np.uint64(1 << 63)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: Fibonacci hashing
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_P = np.uint64(0x100000001B3)
_STRING_CHUNK_BYTES = 1 << 20
_POW_LEN = 4096
_POW = np.concatenate(
    [np.ones(1, dtype=np.uint64), np.cumprod(np.full(_POW_LEN - 1, _P, dtype=np.uint64))]
)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast bijection that scatters every input bit."""
    z = x ^ (x >> np.uint64(30))
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


_M1_INV = np.uint64(pow(0xBF58476D1CE4E5B9, -1, 2**64))
_M2_INV = np.uint64(pow(0x94D049BB133111EB, -1, 2**64))


def _unshift(z: np.ndarray, shift: int) -> np.ndarray:
    """Invert ``z ^= z >> shift``."""
    out = z.copy()
    s = shift
    while s < 64:
        out = z ^ (out >> np.uint64(shift))
        s += shift
    return out


def unmix(m: np.ndarray) -> np.ndarray:
    """The inverse of ``mix``."""
    z = _unshift(m, 31)
    z = z * _M2_INV
    z = _unshift(z, 27)
    z = z * _M1_INV
    return _unshift(z, 30)


def is_exact_type(t: pa.DataType) -> bool:
    """Types whose values fit in 64 bits and order like integers."""
    t = key_value_type(t)
    return (
        pa.types.is_integer(t)
        or pa.types.is_date(t)
        or pa.types.is_timestamp(t)
        or pa.types.is_time(t)
        or pa.types.is_duration(t)
    )


def key_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A key column as one array that codes can be read from: chunks combined, dictionaries
    decoded, string and binary views as their large types."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if getattr(pa.types, "is_string_view", lambda _t: False)(column.type):
        column = column.cast(pa.large_string())
    if getattr(pa.types, "is_binary_view", lambda _t: False)(column.type):
        column = column.cast(pa.large_binary())
    return column


def exact_codes(array: pa.Array) -> np.ndarray:
    """Order-preserving uint64 codes of an integer-like array (nulls give arbitrary codes)."""
    t = array.type
    if pa.types.is_integer(t):
        values = fixed_values(array, _NUMPY_INTS[t.bit_width, pa.types.is_signed_integer(t)])
        if pa.types.is_signed_integer(t):
            return values.astype(np.int64, copy=False).view(np.uint64) ^ SIGN
        return values.astype(np.uint64, copy=False)
    values = fixed_values(array, np.int32 if t.bit_width == 32 else np.int64)
    return values.astype(np.int64, copy=False).view(np.uint64) ^ SIGN


_NUMPY_INTS = {
    (8, True): np.int8,
    (16, True): np.int16,
    (32, True): np.int32,
    (64, True): np.int64,
    (8, False): np.uint8,
    (16, False): np.uint16,
    (32, False): np.uint32,
    (64, False): np.uint64,
}


def _int_view_type(t: pa.DataType) -> pa.DataType:
    return pa.int32() if t.bit_width == 32 else pa.int64()


def exact_code_of(value: int, t: pa.DataType) -> np.uint64:
    """The code of one integer value of type ``t`` (for statistics bounds)."""
    if pa.types.is_unsigned_integer(t):
        return np.uint64(value)
    return np.array([value], dtype=np.int64).view(np.uint64)[0] ^ SIGN


def decode_exact(code: np.uint64, t: pa.DataType) -> object:
    """The key value behind an exact code (for messages)."""
    t = key_value_type(t)
    if pa.types.is_unsigned_integer(t):
        return int(code)
    raw = int(np.array([code ^ SIGN], dtype=np.uint64).view(np.int64)[0])
    if pa.types.is_integer(t):
        return raw
    return pa.array([raw], pa.int64()).cast(_int_view_type(t)).view(t)[0].as_py()


def _bytes_hash(array: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string/binary value, vectorized over the data buffer."""
    n = len(array)
    out = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return out
    large = pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type)
    bufs = array.buffers()
    off_type = np.int64 if large else np.int32
    offsets = np.frombuffer(bufs[1], dtype=off_type)[array.offset : array.offset + n + 1]
    offsets = offsets.astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    row = 0
    while row < n:
        # Rows [row, stop) hold about _STRING_CHUNK_BYTES bytes: bounded temporaries.
        limit = offsets[row] + _STRING_CHUNK_BYTES
        stop = int(np.searchsorted(offsets, limit, side="right")) - 1
        stop = min(n, max(stop, row + 1))
        lo, hi = int(offsets[row]), int(offsets[stop])
        lens = lengths[row:stop]
        if hi > lo:
            chunk = data[lo:hi].astype(np.uint64) + np.uint64(1)
            starts = offsets[row:stop] - lo
            rel = np.arange(hi - lo, dtype=np.int64) - np.repeat(starts, lens)
            chunk *= _POW[rel & (_POW_LEN - 1)]
            nonempty = lens > 0
            sums = np.zeros(stop - row, dtype=np.uint64)
            sums[nonempty] = np.add.reduceat(chunk, starts[nonempty])
        else:
            sums = np.zeros(stop - row, dtype=np.uint64)
        out[row:stop] = sums + lens.astype(np.uint64) * GOLDEN
        row = stop
    return mix(out)


def _fixed_hash(array: pa.Array, width: int) -> np.ndarray:
    n = len(array)
    data = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    data = data[array.offset * width : (array.offset + n) * width].reshape(n, width)
    pad = (-width) % 8
    if pad:
        data = np.concatenate([data, np.zeros((n, pad), dtype=np.uint8)], axis=1)
    words = np.ascontiguousarray(data).view(np.uint64)
    h = np.full(n, np.uint64(width), dtype=np.uint64)
    for i in range(words.shape[1]):
        h = mix(h * _P + words[:, i])
    return h


def column_hash(array: pa.Array) -> np.ndarray:
    """A 64-bit hash per value of any key type (nulls give arbitrary values)."""
    t = array.type
    if is_exact_type(t):
        return mix(exact_codes(array) + GOLDEN)
    if pa.types.is_boolean(t):
        return mix(bools(array).astype(np.uint64))
    if pa.types.is_string(t) or pa.types.is_binary(t):
        return _bytes_hash(array)
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return _bytes_hash(array)
    if pa.types.is_fixed_size_binary(t):
        return _fixed_hash(array, t.byte_width)
    if pa.types.is_decimal(t):
        return _fixed_hash(array.view(pa.binary(t.byte_width)), t.byte_width)
    raise ValueError(f"cannot hash key values of type {t}")


class KeyCodec:
    """Turns the key columns of a table (in the target's types) into uint64 codes."""

    def __init__(self, schema: pa.Schema, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)
        self.types = [key_value_type(schema.field(k).type) for k in keys]
        self.exact = len(keys) == 1 and is_exact_type(self.types[0])

    def key_arrays(self, table: pa.Table) -> list[pa.Array]:
        """The key columns of ``table``, ready for ``codes``."""
        return [key_array(table.column(k)) for k in self.keys]

    def codes(self, arrays: Sequence[pa.Array]) -> tuple[np.ndarray, np.ndarray | None]:
        """``(codes, valid)``: ``valid`` is None when no key value is null."""
        valid = None
        for a in arrays:
            if a.null_count:
                v = validity(a)
                if v is not None:
                    valid = v if valid is None else (valid & v)
        if self.exact:
            return exact_codes(arrays[0]), valid
        h = np.full(len(arrays[0]), np.uint64(len(arrays)), dtype=np.uint64)
        for a in arrays:
            h = mix(h * _P + column_hash(a))
        return h, valid


def normalize_key_columns(key_columns: str | Sequence[str] | None) -> tuple[str, ...]:
    """``key_columns`` as a non-empty tuple of distinct names ("a,b" and ["a", "b"] both work)."""
    if key_columns is None:
        raise ValueError("key_columns is required: the column(s) that identify a row")
    if isinstance(key_columns, str):
        keys = tuple(k.strip() for k in key_columns.split(",") if k.strip())
    else:
        keys = tuple(key_columns)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"key_columns must be one or more column names, got {key_columns!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"key_columns has a repeated column: {list(keys)}")
    return keys
