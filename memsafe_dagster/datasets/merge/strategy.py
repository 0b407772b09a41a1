"""The strategy table, as data: what a merge does with each kind of row.

Every decision about rows (which target rows a rewritten or compacted file keeps, which source
rows are written, what the counts say) is read from ``RULES``, so the table in DESIGN.md has
exactly one home in the code:

| strategy     | target row whose key is in source | new source row | target row not in source |
|--------------|-----------------------------------|----------------|--------------------------|
| ``insert``     | kept as is                        | inserted       | kept                     |
| ``update``     | replaced by the source row        | ignored        | kept                     |
| ``upsert``     | replaced                          | inserted       | kept                     |
| ``delete``     | removed                           | ignored        | kept                     |
| ``full_merge`` | replaced                          | inserted       | removed                  |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

MatchedTarget = Literal["keep", "replace", "remove"]


@dataclass(frozen=True)
class StrategyRule:
    """One row of the strategy table."""

    name: str
    matched_target: MatchedTarget
    inserts_new: bool
    keeps_unmatched_target: bool

    @property
    def drops_matched_target(self) -> bool:
        """Whether target rows whose key is in the source leave their file."""
        return self.matched_target != "keep"

    @property
    def writes_matched_source(self) -> bool:
        """Whether source rows whose key is in the target are written (as replacements)."""
        return self.matched_target == "replace"

    @property
    def writes_source(self) -> bool:
        return self.inserts_new or self.writes_matched_source

    def target_rows_kept(self, matched: np.ndarray) -> np.ndarray:
        """Of a target file's rows (``matched``: key in source), those that stay in the dataset.

        The same answer whether the file is rewritten because it holds matched keys or because
        it is compacted into new files.
        """
        if not self.keeps_unmatched_target:
            return np.zeros(len(matched), dtype=bool)
        if self.drops_matched_target:
            return ~matched
        return np.ones(len(matched), dtype=bool)

    def source_rows_written(self, matched: np.ndarray, dropped: np.ndarray) -> np.ndarray:
        """Of source rows (``matched``: key in target; ``dropped``: a duplicate set aside),
        those written to the dataset."""
        keep = ~dropped
        if not self.inserts_new:
            keep &= matched
        if not self.writes_matched_source:
            keep &= ~matched
        return keep

    def counts(
        self, *, source_new: int, matched_target: int, target_rows: int
    ) -> tuple[int, int, int]:
        """``(inserted, updated, deleted)`` for a merge that found ``source_new`` new source
        rows and ``matched_target`` target rows whose key is in the source."""
        inserted = source_new if self.inserts_new else 0
        updated = matched_target if self.matched_target == "replace" else 0
        deleted = matched_target if self.matched_target == "remove" else 0
        if not self.keeps_unmatched_target:
            deleted += target_rows - matched_target
        return inserted, updated, deleted

    def source_rows_out(self, *, source_new: int, source_matched: int) -> int:
        """How many source rows the merge writes."""
        return (source_new if self.inserts_new else 0) + (
            source_matched if self.writes_matched_source else 0
        )


RULES: dict[str, StrategyRule] = {
    rule.name: rule
    for rule in (
        StrategyRule("insert", "keep", inserts_new=True, keeps_unmatched_target=True),
        StrategyRule("update", "replace", inserts_new=False, keeps_unmatched_target=True),
        StrategyRule("upsert", "replace", inserts_new=True, keeps_unmatched_target=True),
        StrategyRule("delete", "remove", inserts_new=False, keeps_unmatched_target=True),
        StrategyRule("full_merge", "replace", inserts_new=True, keeps_unmatched_target=False),
    )
}
STRATEGIES: tuple[str, ...] = tuple(RULES)
