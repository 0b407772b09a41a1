"""The strategy table as data (``merge.strategy.RULES``) against DESIGN.md's table, row by row."""

from __future__ import annotations

import numpy as np
import pytest

from memsafe_dagster.datasets.merge.strategy import RULES, STRATEGIES

# DESIGN.md: target row whose key is in source | new source row | target row not in source
TABLE = {
    "insert": ("kept", "inserted", "kept"),
    "update": ("replaced", "ignored", "kept"),
    "upsert": ("replaced", "inserted", "kept"),
    "delete": ("removed", "ignored", "kept"),
    "full_merge": ("replaced", "inserted", "removed"),
}


def test_every_strategy_has_one_rule() -> None:
    assert tuple(TABLE) == STRATEGIES


@pytest.mark.parametrize("strategy", list(TABLE))
def test_rows_kept_and_written_follow_the_table(strategy: str) -> None:
    matched_target, new_source, unmatched_target = TABLE[strategy]
    rule = RULES[strategy]
    # A target file: rows 0 and 2 have keys in the source.
    matched = np.array([True, False, True, False])
    kept = rule.target_rows_kept(matched)
    assert list(kept[[0, 2]]) == [matched_target == "kept"] * 2
    assert list(kept[[1, 3]]) == [unmatched_target == "kept"] * 2
    # Source rows: 0 matches the target, 1 is new, 2 is a dropped duplicate.
    src_matched = np.array([True, False, False])
    dropped = np.array([False, False, True])
    written = rule.source_rows_written(src_matched, dropped)
    assert written[0] == (matched_target == "replaced")
    assert written[1] == (new_source == "inserted")
    assert not written[2]


@pytest.mark.parametrize("strategy", list(TABLE))
def test_counts_follow_the_table(strategy: str) -> None:
    matched_target, new_source, unmatched_target = TABLE[strategy]
    # 10 target rows, 4 of them matched; 7 source rows, 4 matched, 3 new.
    inserted, updated, deleted = RULES[strategy].counts(
        source_new=3, matched_target=4, target_rows=10
    )
    assert inserted == (3 if new_source == "inserted" else 0)
    assert updated == (4 if matched_target == "replaced" else 0)
    assert deleted == (4 if matched_target == "removed" else 0) + (
        6 if unmatched_target == "removed" else 0
    )
    out = RULES[strategy].source_rows_out(source_new=3, source_matched=4)
    assert out == (3 if new_source == "inserted" else 0) + (
        4 if matched_target == "replaced" else 0
    )
