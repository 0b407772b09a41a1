"""Polars: lazy scans, anti join on the key, concat with the source, ``sink_parquet``."""

from __future__ import annotations

import argparse
from typing import Any

import polars as pl

from benchmarks.contenders._common import KEY, run_contender


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """The upsert as one streaming query."""
    target = pl.scan_parquet(args.target / "*.parquet")
    source = pl.scan_parquet(args.source / "*.parquet")
    survivors = target.join(source.select(KEY), on=KEY, how="anti")
    pl.concat([survivors, source]).sink_parquet(args.out / "part-00000.parquet", mkdir=True)
    return {"polars": pl.__version__}


if __name__ == "__main__":
    run_contender("polars", merge)
