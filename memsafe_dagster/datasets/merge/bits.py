"""Packed bit sets: one bit per row, for matched target rows and matched or dropped source rows.

A merge marks millions of rows; a bit each (not a bool, not a Python set) keeps that to an
eighth of a byte per row, and marking the same row twice (a spilled index matched in several
passes) is harmless.
"""

from __future__ import annotations

import numpy as np


class BitSet:
    """A bit per row of ``n`` rows, all clear at first."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.bits = np.zeros((n + 7) // 8, dtype=np.uint8)

    def set(self, positions: np.ndarray) -> None:
        """Set the bits at ``positions`` (any integer array; repeats are fine)."""
        if len(positions):
            positions = positions.astype(np.int64, copy=False)
            bit = np.left_shift(np.uint8(1), (positions & 7).astype(np.uint8))
            np.bitwise_or.at(self.bits, positions >> 3, bit)

    def slice(self, start: int, stop: int) -> np.ndarray:
        """The bits of rows ``[start, stop)`` as a bool array."""
        lo, hi = start >> 3, (stop + 7) >> 3
        bits = np.unpackbits(self.bits[lo:hi], bitorder="little").astype(bool)
        skip = start - (lo << 3)
        return bits[skip : skip + (stop - start)]

    def count(self) -> int:
        """How many bits are set."""
        if hasattr(np, "bitwise_count"):
            return int(np.bitwise_count(self.bits).sum(dtype=np.int64))
        return int(np.unpackbits(self.bits).sum(dtype=np.int64))
