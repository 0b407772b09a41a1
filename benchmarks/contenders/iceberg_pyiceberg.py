"""pyiceberg: ``Table.upsert`` of the whole source (it takes an in-memory ``pa.Table``).

The source is read into memory inside the timed section, as the API requires; pyiceberg finds
the matched rows with an ``In`` filter over every source key, compares them row by row and
commits an overwrite plus appends.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.contenders import _iceberg
from benchmarks.contenders._common import KEY, run_contender


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """The timed upsert."""
    import pyarrow.dataset as ds
    import pyiceberg

    table = _iceberg.catalog(args.out).load_table(_iceberg.TABLE)
    source = ds.dataset(args.source, format="parquet").to_table()
    result = table.upsert(source.cast(table.schema().as_arrow()), join_cols=[KEY])
    return {
        "pyiceberg": pyiceberg.__version__,
        "rows_updated": result.rows_updated,
        "rows_inserted": result.rows_inserted,
        "snapshots": [s.summary.operation.value for s in table.snapshots()],
    }


if __name__ == "__main__":
    run_contender("iceberg_pyiceberg", merge, prepare=_iceberg.prepare, output_format="iceberg")
