"""Check a contender's output against the generated dataset it merged.

An upsert is correct when the output holds exactly ``target + inserts`` rows, every key once,
and the sampled rows match: updated and new keys carry the source's row, untouched keys the
target's. The floor contender copies the target, so its output must equal the target instead.

The runner calls :func:`verify` in a helper process, so reading outputs never raises the
runner's own memory while contenders run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from benchmarks.contenders._common import KEY, OutputFormat
from benchmarks.datagen import SCHEMA, DatasetSpec, GeneratedData


@dataclass(frozen=True)
class Verification:
    """The verdict on one output, with the figures it rests on."""

    ok: bool
    rows: int
    distinct_keys: int
    detail: str


def open_output(path: Path, output_format: OutputFormat) -> ds.Dataset:
    """The output as a dataset: through the Delta log for Delta tables, the current snapshot's
    data files for Iceberg tables, else the Parquet files.

    PyArrow skips ``_``- and ``.``-prefixed paths, so staging areas and logs are not read.
    """
    if output_format == "delta":
        from deltalake import DeltaTable

        return DeltaTable(str(path)).to_pyarrow_dataset()
    if output_format == "iceberg":
        from benchmarks.contenders._iceberg import data_files

        return ds.dataset(data_files(path), format="parquet")
    return ds.dataset(path, format="parquet")


def _rows_by_key(
    dataset: ds.Dataset, keys: list[int], schema: pa.Schema = SCHEMA
) -> dict[int, dict[str, Any]]:
    table = dataset.to_table(filter=pc.field(KEY).isin(keys))
    table = table.select(schema.names).cast(schema)
    return {row[KEY]: row for row in table.to_pylist()}


def _mismatches(
    output: dict[int, dict[str, Any]], expected: dict[int, dict[str, Any]], keys: list[int]
) -> int:
    return sum(1 for k in keys if k not in expected or output.get(k) != expected[k])


def verify(
    path: Path, output_format: OutputFormat, data: GeneratedData, *, merged: bool = True
) -> Verification:
    """Verify the output at ``path``: a merged dataset, or (``merged=False``) a target copy."""
    try:
        return _verify(open_output(path, output_format), data, merged)
    except (OSError, pa.ArrowException, ValueError) as exc:
        return Verification(False, 0, 0, f"unreadable output: {type(exc).__name__}: {exc}")


def _verify(output: ds.Dataset, data: GeneratedData, merged: bool) -> Verification:
    keys = output.to_table(columns=[KEY])[KEY]
    rows = len(keys)
    distinct = pc.count_distinct(keys).as_py() if rows else 0
    del keys
    expected_rows = data.expected_rows if merged else int(data.manifest["spec"]["target_rows"])
    problems = []
    if rows != expected_rows:
        problems.append(f"{rows} rows, expected {expected_rows}")
    if distinct != rows:
        problems.append(f"{rows - distinct} duplicate keys")

    m = data.manifest
    updated, new, untouched = (
        m["sample_updated_keys"],
        m["sample_new_keys"],
        m["sample_untouched_keys"],
    )
    schema = DatasetSpec(**m["spec"]).schema  # wide specs: the payload columns too
    got = _rows_by_key(output, updated + new + untouched, schema)
    target = _rows_by_key(ds.dataset(data.target, format="parquet"), updated + untouched, schema)
    if merged:
        source = _rows_by_key(ds.dataset(data.source, format="parquet"), updated + new, schema)
        checks = [("updated", updated, source), ("new", new, source)]
    else:
        checks = [("copied", updated, target)]
    checks.append(("untouched", untouched, target))
    for label, sample, expected in checks:
        bad = _mismatches(got, expected, sample)
        if bad:
            problems.append(f"{bad}/{len(sample)} sampled {label} keys wrong or missing")
    if problems:
        return Verification(False, rows, distinct, "; ".join(problems))
    return Verification(True, rows, distinct, "ok")
