"""What an Iceberg merge reports beyond ``MergeResult``, and its commit conflict error."""

from __future__ import annotations

from dataclasses import dataclass, fields

from memsafe_dagster.datasets.merge.result import MergeResult


class IcebergCommitConflictError(RuntimeError):
    """Another writer committed to the table, conflicting with this merge (or the catalog's
    retries ran out): nothing of this merge was committed and its data files were deleted."""


@dataclass
class IcebergMergeResult(MergeResult):
    """``MergeResult`` plus the Iceberg side: the table, the snapshot the merge read
    (``parent_snapshot_id``) and the one it committed (``snapshot_id``, None when nothing
    changed), and how many times the merge ran (``attempts``: more than 1 after a conflict
    with another writer, re-planned against the new snapshot)."""

    table: str | None = None
    snapshot_id: int | None = None
    parent_snapshot_id: int | None = None
    attempts: int = 1

    @classmethod
    def of(cls, result: MergeResult, **iceberg: object) -> IcebergMergeResult:
        """``result``'s figures with the Iceberg fields added."""
        base = {f.name: getattr(result, f.name) for f in fields(MergeResult)}
        return cls(**base, **iceberg)  # type: ignore[arg-type]
