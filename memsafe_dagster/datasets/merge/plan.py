"""The write plan: from what matching found to what the commit changes, by the strategy table.

``plan_writes`` is pure (footer facts and match counts in, decisions out), so it is tested
directly against the table: which files the commit removes, which of their rows are copied
into new files and where, which small files of earlier merges are folded into this merge's new
files (compaction), and the counts the result reports. Which *rows* of a rewritten or compacted
file survive is the rule's ``target_rows_kept``, applied by the rewrite itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from memsafe_dagster.datasets.merge.strategy import StrategyRule

# Survivors of a rewritten file below target_file_rows / 8 join the new-rows files instead of
# becoming a small file of their own.
SMALL_FILE_FRACTION = 8


class PlannedFile(Protocol):
    """What the plan needs of a target file (``target.TargetFile`` has it)."""

    path: str
    rel: str
    rows: int
    matched: int

    @property
    def is_ins_file(self) -> bool: ...


@dataclass(frozen=True)
class Rewrite:
    """Copy the rows the strategy keeps of ``file`` into a new file: its own (``"own"``, in
    the file's directory) or the merge's new-rows files (``"new_rows"``)."""

    file: PlannedFile
    into: Literal["own", "new_rows"]


@dataclass
class WritePlan:
    """What one merge writes and removes, and the counts it reports."""

    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    source_rows_out: int = 0
    replaced: list[PlannedFile] = field(default_factory=list)
    compacted: list[PlannedFile] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    emptied: list[PlannedFile] = field(default_factory=list)

    @property
    def removed(self) -> list[PlannedFile]:
        """Every file the commit removes."""
        return [*self.replaced, *self.compacted]

    @property
    def rewrite_rows(self) -> int:
        """Rows the rewrites read (the progress they add)."""
        return sum(r.file.rows for r in self.rewrites)


def plan_writes(
    rule: StrategyRule,
    files: Sequence[PlannedFile],
    *,
    source_rows: int,
    source_matched: int,
    source_dropped: int,
    target_file_rows: int,
    compact_small_files: bool = True,
    allow_empty_source: bool = False,
) -> WritePlan:
    """The plan for a merge whose source had ``source_rows`` rows, ``source_matched`` of them
    with a key in the target and ``source_dropped`` set aside as duplicates, into ``files``
    (their ``matched`` counts set by the key scan)."""
    target_rows = sum(f.rows for f in files)
    empties_target = not rule.keeps_unmatched_target and source_rows == 0 and target_rows
    if empties_target and not allow_empty_source:
        raise ValueError(
            f"{rule.name} with an empty source would delete all {target_rows:,} rows of "
            "the target; pass allow_empty_source=True if that is intended"
        )
    source_new = source_rows - source_matched - source_dropped
    matched_target = sum(f.matched for f in files)
    plan = WritePlan(
        source_rows_out=rule.source_rows_out(source_new=source_new, source_matched=source_matched)
    )
    plan.inserted, plan.updated, plan.deleted = rule.counts(
        source_new=source_new, matched_target=matched_target, target_rows=target_rows
    )
    if not rule.keeps_unmatched_target:
        plan.replaced = list(files)
    elif rule.drops_matched_target:
        plan.replaced = [f for f in files if f.matched]
    replaced = {f.path for f in plan.replaced}
    if compact_small_files and plan.source_rows_out:
        room = target_file_rows - plan.source_rows_out % target_file_rows
        for f in sorted(files, key=lambda f: (f.rows, f.path)):
            if f.path in replaced or not f.is_ins_file:
                continue
            if f.rows >= target_file_rows or f.rows > room:
                continue
            plan.compacted.append(f)
            room -= f.rows
    if rule.keeps_unmatched_target:
        small = max(1, target_file_rows // SMALL_FILE_FRACTION)
        for f in plan.replaced:
            survivors = f.rows - f.matched
            if survivors == 0:
                plan.emptied.append(f)
            elif survivors < small or f.is_ins_file:
                plan.rewrites.append(Rewrite(f, "new_rows"))
            else:
                plan.rewrites.append(Rewrite(f, "own"))
    plan.rewrites += [Rewrite(f, "new_rows") for f in plan.compacted]
    return plan
