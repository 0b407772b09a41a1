"""The floor: read and rewrite each target file with PyArrow defaults, one file at a time, no
merge. What "just rewrite it all with PyArrow" costs: a reference point, not a lower bound
(its default writer dictionary-encodes every column). Its output is a copy of the target.
"""

from __future__ import annotations

import argparse
from typing import Any

import pyarrow.parquet as pq

from benchmarks.contenders._common import parquet_files, run_contender

ROWS_PER_GROUP = 131_072


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Read each file whole and write it back under ``--out``."""
    args.out.mkdir(parents=True)
    files = parquet_files(args.target)
    for path in files:
        pq.write_table(pq.read_table(path), args.out / path.name, row_group_size=ROWS_PER_GROUP)
    return {"files": len(files)}


if __name__ == "__main__":
    run_contender("floor", merge)
