"""MergeResult: what a merge did, in counts, files, time and memory."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import pyarrow as pa

from memsafe_dagster.memory import MemoryPressureLevel


@dataclass
class MergeResult:
    """Counts, files and memory figures of one merge (``to_dict()`` is JSON-ready).

    Rows: ``source_count`` rows arrived from the source; ``updated`` target rows were replaced
    by source rows, ``inserted`` source rows carried new keys, ``deleted`` target rows were
    removed; ``target_count_after = target_count_before + inserted - deleted`` (and for
    update/upsert/full_merge the replaced rows are counted once in ``updated``).
    Files: ``files_rewritten`` target files held a matched key (or all of them, for
    full_merge) and were replaced; ``files_compacted`` small files from earlier merges were
    folded into this merge's new files; ``files_removed`` is every file the commit deleted,
    ``files_added`` every file it published, ``files_untouched`` the target files left as
    they are (most of them never read past their footer). ``schema`` is the target's schema
    after the merge (None when there is no target and nothing was written), so a caller needs
    to re-read nothing after the commit.
    """

    strategy: str
    source_count: int = 0
    target_count_before: int = 0
    target_count_after: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    files_rewritten: int = 0
    files_added: int = 0
    files_removed: int = 0
    files_untouched: int = 0
    duration_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_pyarrow_mb: float = 0.0
    max_pressure: MemoryPressureLevel = MemoryPressureLevel.NORMAL
    files_compacted: int = 0
    files_pruned: int = 0
    row_groups_pruned: int = 0
    duplicates_dropped: int = 0
    key_passes: int = 1
    spilled: bool = False
    committed: bool = False
    txn: str | None = None
    phases_s: dict[str, float] = field(default_factory=dict)
    schema: pa.Schema | None = field(default=None, compare=False)

    @property
    def changed(self) -> bool:
        """True when the merge published anything (a no-op merge commits nothing)."""
        return self.committed

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON types (pressure as its value, times rounded)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["schema"] = None if self.schema is None else {f.name: str(f.type) for f in self.schema}
        out["max_pressure"] = self.max_pressure.value
        out["duration_s"] = round(self.duration_s, 4)
        out["peak_rss_mb"] = round(self.peak_rss_mb, 2)
        out["peak_pyarrow_mb"] = round(self.peak_pyarrow_mb, 2)
        out["phases_s"] = {k: round(v, 4) for k, v in self.phases_s.items()}
        return out
