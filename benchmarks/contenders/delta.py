"""delta-rs: ``DeltaTable.merge`` (update all when matched, insert all when not).

The target copy becomes a Delta table untimed (``convert_to_deltalake`` only reads the Parquet
footers and writes the log); the merge is timed. Old file versions stay on disk until a vacuum,
so the output must be read through the Delta log.
"""

from __future__ import annotations

import argparse
from typing import Any

import deltalake
import pyarrow.dataset as ds
from deltalake import DeltaTable, convert_to_deltalake

from benchmarks.contenders._common import KEY, copy_target, run_contender


def prepare(args: argparse.Namespace) -> None:
    """Copy the target and turn the copy into a Delta table in place."""
    copy_target(args)
    convert_to_deltalake(str(args.out))


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """The timed Delta merge."""
    source = ds.dataset(args.source, format="parquet").to_table()
    metrics = (
        DeltaTable(str(args.out))
        .merge(source, predicate=f"t.{KEY} = s.{KEY}", source_alias="s", target_alias="t")
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )
    return {"deltalake": deltalake.__version__, **metrics}


if __name__ == "__main__":
    run_contender("delta", merge, prepare=prepare, output_format="delta")
