"""Naive PyArrow: read target and source whole, drop matched rows with ``pc.is_in``, write."""

from __future__ import annotations

import argparse
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from benchmarks.contenders._common import KEY, run_contender

ROWS_PER_FILE = 1_000_000
ROWS_PER_GROUP = 131_072


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Everything in memory at once."""
    target = ds.dataset(args.target, format="parquet").to_table()
    source = ds.dataset(args.source, format="parquet").to_table().cast(target.schema)
    keep = pc.invert(pc.is_in(target[KEY], value_set=source[KEY]))
    result = pa.concat_tables([target.filter(keep), source])
    ds.write_dataset(
        result,
        args.out,
        format="parquet",
        basename_template="part-{i}.parquet",
        max_rows_per_file=ROWS_PER_FILE,
        max_rows_per_group=ROWS_PER_GROUP,
    )
    return {"pyarrow": pa.__version__}


if __name__ == "__main__":
    run_contender("naive_pyarrow", merge)
