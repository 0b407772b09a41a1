"""The merge's key index: source key codes sorted, with a bitmap prefilter and a bucket directory.

Codes come from ``datasets.keys`` (exact for a single integer-like key, hashed otherwise). The
index keeps the source's key values too when codes are hashed, and every code match is verified
against them, so a hash collision can cost a comparison but never a wrong match.

Lookups go through a bitmap prefilter (a few bits per key, built once) and a binary search on
the sorted codes: no per-call hash-set rebuild (the ``pc.is_in`` trap) and no Python loop per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memsafe_dagster.datasets.arrays import bools, fixed_values, from_numpy, indices
from memsafe_dagster.datasets.keys import (
    GOLDEN,
    decode_exact,
    exact_codes,
    is_exact_type,
    key_array,
    mix,
    unmix,
)


class DuplicateKeyError(ValueError):
    """Duplicate keys in the source (``on_duplicate_keys="error"``)."""


@dataclass
class BuildStats:
    duplicates_dropped: int = 0


class KeyIndex:
    """Source key codes sorted by their mixed hash, with source positions (and key values when
    hashed), a bucket directory on the hash's top bits and a bitmap prefilter.

    ``lookup`` maps target key codes to the index entries they match: the bitmap rejects most
    non-members with one probe into a few bits per key, a member's bucket is found directly in
    the directory (about one entry per bucket), so a lookup costs a handful of vectorized passes
    instead of a binary search. ``matched`` marks the entries that matched a target row.
    """

    def __init__(
        self,
        mixed: np.ndarray,
        positions: np.ndarray,
        key_values: pa.Table | None,
        *,
        exact: bool,
        sorted_codes: np.ndarray | None = None,
        codes: np.ndarray | None = None,
        lo: int = 0,
        hi: int | None = None,
    ) -> None:
        self.mixed = mixed
        self.positions = positions
        self.key_values = key_values
        self.exact = exact
        self.sorted_codes = sorted_codes
        self.lo = np.uint64(lo)
        self.hi = None if hi is None else np.uint64(hi)
        n = len(mixed)
        self.matched = np.zeros(n, dtype=bool)
        self.bits = int(min(30, max(12, np.ceil(np.log2(max(n, 1) * 16)))))
        self._shift = np.uint64(64 - self.bits)
        self.bitmap = np.zeros(1 << (self.bits - 3), dtype=np.uint8)
        self.dir_bits = int(min(27, max(4, np.ceil(np.log2(max(n, 1))))))
        self._dir_shift = np.uint64(64 - self.dir_bits)
        if n:
            h = self._bitmap_slot(unmix(mixed) if codes is None else codes)
            bit = np.left_shift(np.uint8(1), (h & np.uint64(7)).astype(np.uint8))
            np.bitwise_or.at(self.bitmap, h >> np.uint64(3), bit)
            del h, bit
        counts = np.bincount(
            (mixed >> self._dir_shift).astype(np.int64), minlength=1 << self.dir_bits
        )
        dtype = np.int32 if n < 2**31 else np.int64
        self.directory = np.zeros((1 << self.dir_bits) + 1, dtype=dtype)
        np.cumsum(counts, out=self.directory[1:])
        self._key_arrays = (
            [key_array(c) for c in key_values.columns] if key_values is not None else None
        )
        self._column_ranges: list[object] | None = None

    def __len__(self) -> int:
        return len(self.mixed)

    @property
    def nbytes(self) -> int:
        extra = self.key_values.nbytes if self.key_values is not None else 0
        sorted_codes = self.sorted_codes.nbytes if self.sorted_codes is not None else 0
        return (
            self.mixed.nbytes
            + self.positions.nbytes
            + self.bitmap.nbytes
            + self.directory.nbytes
            + sorted_codes
            + len(self)
            + extra
        )

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        codes: np.ndarray,
        positions: np.ndarray | None,
        key_values: pa.Table | None,
        *,
        exact: bool,
        on_duplicate: str,
        key_names: Sequence[str],
        key_type: pa.DataType | None = None,
        lo: int = 0,
        hi: int | None = None,
    ) -> tuple[KeyIndex, np.ndarray]:
        """Sort, resolve duplicate keys by ``on_duplicate`` and index.

        ``positions`` must ascend (source order); None means ``0..n-1``. Returns the index and
        the source positions dropped as duplicates ("first"/"last"); raises
        ``DuplicateKeyError`` for "error".
        """
        sorted_codes = np.sort(codes) if exact else None  # statistics pruning
        mixed = mix(codes)
        # mix is a bijection: equal codes <=> equal mixed values, so duplicates are adjacent.
        # An unstable sort is twice as fast; only duplicates need the stable one, which keeps
        # their source order for "first"/"last".
        order = np.argsort(mixed)
        sorted_mixed = mixed[order]
        same = sorted_mixed[1:] == sorted_mixed[:-1]
        if same.any():  # the sorted values are the same either way, and so is ``same``
            order = np.argsort(mixed, kind="stable")
            sorted_mixed = mixed[order]
        mixed = sorted_mixed
        small = positions is None or len(positions) == 0 or positions.max() < 2**31
        position_type = np.int32 if len(mixed) < 2**31 and small else np.int64
        if positions is None:
            positions = order.astype(position_type)
        else:
            positions = positions[order].astype(position_type)
        if key_values is not None:
            key_values = key_values.take(indices(order))
        del order
        dropped = np.zeros(0, dtype=np.int64)
        if same.any():
            if not exact:
                mixed, positions, key_values, same = _regroup_hashed(
                    mixed, positions, key_values, same
                )
            if same.any():
                if on_duplicate == "error":
                    first = int(np.flatnonzero(same)[0])
                    if key_values is not None:
                        example = {
                            k: key_values.column(i)[first].as_py() for i, k in enumerate(key_names)
                        }
                    else:
                        value = unmix(mixed[first : first + 1])[0]
                        example = {
                            key_names[0]: decode_exact(value, key_type)
                            if key_type is not None
                            else int(value)
                        }
                    raise DuplicateKeyError(_duplicate_message(key_names, example, int(same.sum())))
                keep = np.ones(len(mixed), dtype=bool)
                if on_duplicate == "first":
                    keep[1:][same] = False
                else:
                    keep[:-1][same] = False
                dropped = positions[~keep].astype(np.int64)
                mixed, positions = mixed[keep], positions[keep]
                if sorted_codes is not None:
                    sorted_codes = np.sort(unmix(mixed))
                if key_values is not None:
                    key_values = key_values.take(indices(np.flatnonzero(keep)))
        # The bitmap is keyed on codes, and dropped duplicates share their code with a kept
        # entry: the original codes give exactly the right bits.
        index = cls(
            mixed,
            positions,
            key_values,
            exact=exact,
            sorted_codes=sorted_codes,
            codes=codes,
            lo=lo,
            hi=hi,
        )
        return index, dropped

    # -- lookups ----------------------------------------------------------------------------------

    def _bitmap_slot(self, codes: np.ndarray) -> np.ndarray:
        """Fibonacci hashing (one multiply, one shift): cheap enough for every target row,
        good enough for a prefilter; the full ``mix`` runs on the few candidates only."""
        return (codes * GOLDEN) >> self._shift

    def candidates(
        self, codes: np.ndarray, valid: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows whose code may be in the index (the bitmap says no for most non-members), and
        their mixed codes."""
        h = self._bitmap_slot(codes)
        # int64 indices and uint8 shifts: no conversion pass inside the fancy indexing.
        byte = (h >> np.uint64(3)).view(np.int64)
        mask = (self.bitmap[byte] >> (h.astype(np.uint8) & np.uint8(7))) & 1
        del h, byte
        mask = mask.view(bool)
        if valid is not None:
            mask &= valid
        if self.lo or self.hi is not None:
            mask &= codes >= self.lo
            if self.hi is not None:
                mask &= codes < self.hi
        rows = np.flatnonzero(mask)
        return rows, mix(codes[rows])

    def lookup(
        self,
        codes: np.ndarray,
        valid: np.ndarray | None,
        key_arrays: Sequence[pa.Array] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, entries)``: target rows that match, and the index entry each one matches."""
        empty = np.zeros(0, np.int64)
        if len(self) == 0 or len(codes) == 0:
            return empty, empty
        rows, m = self.candidates(codes, valid)
        if len(rows) == 0:
            return empty, empty
        bucket = (m >> self._dir_shift).view(np.int64)
        at = self.directory[bucket].astype(np.int64)
        stop = self.directory[bucket + 1].astype(np.int64)
        del bucket
        live = at < stop
        rows, m, at, stop = rows[live], m[live], at[live], stop[live]
        found_rows: list[np.ndarray] = []
        found_entries: list[np.ndarray] = []
        while len(rows):
            eq = self.mixed[at] == m
            found_rows.append(rows[eq])
            found_entries.append(at[eq])
            # Exact codes are unique in the index: a match ends the search. Hashed codes may
            # repeat for distinct keys (a collision): every equal entry is a candidate.
            go_on = ~eq if self.exact else np.ones(len(rows), dtype=bool)
            at = at + 1
            go_on &= at < stop
            rows, m, at, stop = rows[go_on], m[go_on], at[go_on], stop[go_on]
        if not found_rows:
            return empty, empty
        rows = np.concatenate(found_rows).astype(np.int64)
        entries = np.concatenate(found_entries).astype(np.int64)
        if self.exact or len(rows) == 0:
            return rows, entries
        assert key_arrays is not None
        ok = self._verify(key_arrays, rows, entries)
        return rows[ok], entries[ok]

    def _verify(
        self, key_arrays: Sequence[pa.Array], rows: np.ndarray, entries: np.ndarray
    ) -> np.ndarray:
        """True where target row ``rows[i]`` has exactly the key of index entry ``entries[i]``."""
        assert self._key_arrays is not None
        ok = None
        row_idx, entry_idx = indices(rows), indices(entries)
        for i, target in enumerate(key_arrays):
            a = target.take(row_idx)
            b = self._key_arrays[i].take(entry_idx)
            eq = bools(pc.equal(a, b))
            ok = eq if ok is None else ok & eq
        assert ok is not None
        return ok

    # -- statistics pruning ------------------------------------------------------------------------

    def may_contain_range(self, bounds: Sequence[tuple[object, object] | None]) -> bool:
        """False only when some key column's [min, max] holds none of this index's values.

        ``bounds`` has one entry per key column: ``(lo, hi)`` as codes (integer-like columns)
        or Python str/bytes (string/binary columns), or None when unknown.
        """
        if len(self) == 0:
            return False
        if self.exact:
            b = bounds[0]
            if b is None:
                return True
            lo, hi = b
            if self.sorted_codes is None:
                self.sorted_codes = np.sort(unmix(self.mixed))
            i = np.searchsorted(self.sorted_codes, np.uint64(lo), side="left")
            j = np.searchsorted(self.sorted_codes, np.uint64(hi), side="right")
            return bool(j > i)
        ranges = self._ranges()
        for b, r in zip(bounds, ranges, strict=True):
            if b is None or r is None:
                continue
            if not _any_within(r, b[0], b[1]):
                return False
        return True

    def _ranges(self) -> list[object]:
        """Per key column: sorted unique values (numpy codes, or an Arrow array), or None."""
        if self._column_ranges is None:
            out: list[object] = []
            assert self.key_values is not None
            for i in range(self.key_values.num_columns):
                col = key_array(self.key_values.column(i))
                t = col.type
                if is_exact_type(t):
                    out.append(np.unique(exact_codes(col)))
                elif (
                    pa.types.is_string(t)
                    or pa.types.is_large_string(t)
                    or pa.types.is_binary(t)
                    or pa.types.is_large_binary(t)
                ):
                    uniq = pc.unique(col)
                    out.append(uniq.take(pc.sort_indices(uniq)))
                else:
                    out.append(None)
            self._column_ranges = out
        return self._column_ranges


def _any_within(values: object, lo: object, hi: object) -> bool:
    if isinstance(values, np.ndarray):
        i = np.searchsorted(values, np.uint64(lo), side="left")
        j = np.searchsorted(values, np.uint64(hi), side="right")
        return bool(j > i)
    arr = values
    n = len(arr)  # type: ignore[arg-type]
    # Binary search with O(log n) scalar reads (a Python object per probe, not per key).
    a, b = 0, n
    while a < b:
        mid = (a + b) // 2
        if arr[mid].as_py() < lo:  # type: ignore[index]
            a = mid + 1
        else:
            b = mid
    return a < n and arr[a].as_py() <= hi  # type: ignore[index]


def _regroup_hashed(
    codes: np.ndarray,
    positions: np.ndarray,
    key_values: pa.Table | None,
    same: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, pa.Table | None, np.ndarray]:
    """Within runs of equal codes, sort by the key values (then position) so equal keys are
    adjacent, and report adjacency of *equal keys* rather than equal codes."""
    assert key_values is not None
    in_run = np.zeros(len(codes), dtype=bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    slots = np.flatnonzero(in_run)
    sub = key_values.take(indices(slots))
    sub = sub.append_column("__code", from_numpy(codes[slots])).append_column(
        "__pos", indices(positions[slots])
    )
    sort_keys = [("__code", "ascending")]
    sort_keys += [(name, "ascending") for name in key_values.column_names]
    sort_keys.append(("__pos", "ascending"))
    perm = fixed_values(pc.sort_indices(sub, sort_keys=sort_keys), np.uint64).astype(np.int64)
    new_slots = slots[perm]
    codes[slots] = codes[new_slots]
    positions[slots] = positions[new_slots]
    full = np.arange(len(codes))
    full[slots] = new_slots
    key_values = key_values.take(indices(full))
    same = codes[1:] == codes[:-1]
    idx = np.flatnonzero(same)
    if len(idx):
        left = key_values.take(indices(idx))
        right = key_values.take(indices(idx + 1))
        eq = None
        for i in range(key_values.num_columns):
            e = bools(pc.equal(left.column(i), right.column(i)))
            eq = e if eq is None else eq & e
        same = same.copy()
        same[idx] = eq
    return codes, positions, key_values, same


def _duplicate_message(key_names: Sequence[str], example: dict, count: int) -> str:
    return (
        f"duplicate key(s) in the source on key column(s) {list(key_names)}: {count} row(s) "
        f"repeat an earlier key, e.g. {example}. Deduplicate the source, or pass "
        "on_duplicate_keys='first' or 'last' to keep one row per key"
    )
