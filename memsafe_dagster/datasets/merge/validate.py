"""The merge's validation: parameters, key columns, and source rows in the target's schema.

Every problem is a ValueError naming the column. The output schema is the target's. Source
columns are cast to it by ``schema.same_kind`` (any type of the same kind, values checked:
int32 -> int64, int64 -> int32 when every value fits, string -> large_string); a different
kind (string -> int, date -> timestamp, naive -> tz-aware) is refused, as are unknown extra
source columns. A target column the source lacks is refused (a replaced row would silently
lose its values there) unless the caller asks for nulls and the column is nullable.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from memsafe_dagster.datasets.keys import check_key_type
from memsafe_dagster.datasets.merge.options import DUPLICATE_POLICIES
from memsafe_dagster.datasets.merge.strategy import STRATEGIES
from memsafe_dagster.datasets.schema import cast_column, check_cast


def check_strategy(strategy: object) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown merge strategy {strategy!r}: strategy must be one of {list(STRATEGIES)}"
        )
    return str(strategy)


def check_duplicate_policy(policy: object) -> str:
    if policy not in DUPLICATE_POLICIES:
        raise ValueError(
            f"on_duplicate_keys must be one of {list(DUPLICATE_POLICIES)}, got {policy!r}"
        )
    return str(policy)


def target_fields_check(target: pa.Schema, keys: Sequence[str]) -> None:
    missing = [k for k in keys if target.get_field_index(k) < 0]
    if missing:
        raise ValueError(
            f"key column(s) {missing} missing from the target dataset (its columns: {target.names})"
        )
    for k in keys:
        check_key_type(k, target.field(k).type, "target")


class SourceConformer:
    """Turns source batches into the output schema (or only the key columns, for delete).

    Checks the schemas once at construction (missing/extra columns, kinds) and every batch as
    it passes (lossy casts, nulls in keys, nulls in non-nullable columns).
    """

    def __init__(
        self,
        source: pa.Schema,
        target: pa.Schema,
        keys: Sequence[str],
        *,
        keys_only: bool = False,
        fill_missing: bool = False,
    ) -> None:
        self.keys = tuple(keys)
        self.fill_missing = fill_missing
        self.target = target
        self.source = source
        self.empty_schema = len(source) == 0
        missing_keys = [k for k in keys if source.get_field_index(k) < 0]
        if missing_keys and not self.empty_schema:
            raise ValueError(
                f"key column(s) {missing_keys} missing from the source (its columns: "
                f"{source.names})"
            )
        if len(set(source.names)) != len(source.names):
            dup = sorted({n for n in source.names if source.names.count(n) > 1})
            raise ValueError(f"source has repeated column name(s) {dup}")
        self.out_schema = pa.schema([target.field(k) for k in keys]) if keys_only else target
        if self.empty_schema:
            return
        for k in keys:
            check_key_type(k, source.field(k).type, "source")
        if not keys_only:
            extra = [n for n in source.names if target.get_field_index(n) < 0]
            if extra:
                raise ValueError(
                    f"source column(s) {extra} do not exist in the target dataset (its "
                    f"columns: {target.names}); drop them or add them to the target first"
                )
        absent = [f.name for f in self.out_schema if source.get_field_index(f.name) < 0]
        if absent and not fill_missing:
            raise ValueError(
                f"source lacks column(s) {absent} of the target dataset (its columns: "
                f"{target.names}); the rows it writes would hold nulls there, so replaced rows "
                "would lose their values. Add the column(s) to the source, or pass "
                "missing_columns='null' to write nulls on purpose"
            )
        for field in self.out_schema:
            idx = source.get_field_index(field.name)
            if idx < 0:
                if not field.nullable:
                    raise ValueError(
                        f"column {field.name!r} is missing from the source and is not "
                        "nullable in the target, so it cannot be filled with nulls"
                    )
                continue
            check_cast(field.name, source.field(idx).type, field.type, lossless=False)

    def conform(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        """``batch`` as a table in the output schema; ValueError on any row that breaks it."""
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        if self.empty_schema and table.num_columns == 0:
            if table.num_rows:
                raise ValueError("source rows have no columns, so they carry no key")
            return self.out_schema.empty_table()
        n = table.num_rows
        columns = []
        for field in self.out_schema:
            idx = table.schema.get_field_index(field.name)
            if idx < 0:
                if field.name in self.keys:
                    raise ValueError(f"key column {field.name!r} missing from a source batch")
                if not field.nullable or not self.fill_missing:
                    raise ValueError(
                        f"column {field.name!r} missing from a source batch (the first batches "
                        "had it)"
                    )
                columns.append(pa.nulls(n, field.type))
                continue
            column = cast_column(table.column(idx), field, lossless=False)
            if column.null_count:
                if field.name in self.keys:
                    raise ValueError(
                        f"key column {field.name!r} has {column.null_count} null value(s) in "
                        "the source: every source row needs a complete key"
                    )
                if not field.nullable:
                    raise ValueError(
                        f"column {field.name!r} has {column.null_count} null value(s) but is "
                        "not nullable in the target"
                    )
            columns.append(column)
        return pa.Table.from_arrays(columns, schema=self.out_schema)


def conform_target_table(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """A target file's rows in the dataset's schema (files written by others may differ)."""
    if table.schema.equals(schema):
        return table
    columns = []
    for field in schema:
        idx = table.schema.get_field_index(field.name)
        if idx < 0:
            if not field.nullable:
                raise ValueError(
                    f"target file {where} lacks the non-nullable column {field.name!r}"
                )
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        try:
            columns.append(cast_column(table.column(idx), field, lossless=False))
        except ValueError as exc:
            raise ValueError(f"target file {where}: {exc}") from None
    return pa.Table.from_arrays(columns, schema=schema)
