"""DuckDB: anti-join the target against the source keys, UNION ALL the source, COPY TO Parquet.

``--memory-limit`` sets DuckDB's ``memory_limit`` (it spills to a temp directory beside
``--out`` when it needs to); threads stay at DuckDB's default.
"""

from __future__ import annotations

import argparse
import shutil
from typing import Any

import duckdb

from benchmarks.contenders._common import KEY, run_contender


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """The upsert as one COPY statement."""
    spill = args.out.parent / f"{args.out.name}.duckdb-spill"
    con = duckdb.connect()
    try:
        if args.memory_limit:
            con.execute(f"SET memory_limit = '{args.memory_limit}'")
        con.execute(f"SET temp_directory = '{spill}'")
        target = f"read_parquet('{args.target}/*.parquet')"
        source = f"read_parquet('{args.source}/*.parquet')"
        con.execute(
            f"""
            COPY (
                SELECT t.* FROM {target} AS t ANTI JOIN {source} AS s ON t.{KEY} = s.{KEY}
                UNION ALL BY NAME
                SELECT * FROM {source}
            ) TO '{args.out}' (FORMAT parquet, PER_THREAD_OUTPUT true)
            """
        )
        settings = dict(
            con.execute(
                "SELECT name, value FROM duckdb_settings() "
                "WHERE name IN ('memory_limit', 'threads')"
            ).fetchall()
        )
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    return {"duckdb": duckdb.__version__, **settings}


def main(memory_limit: str | None = None) -> None:
    """Run as a contender; ``memory_limit`` is the default of ``--memory-limit``."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--memory-limit", default=memory_limit, help="e.g. 512MB")

    name = "duckdb" if memory_limit is None else "duckdb_512"
    run_contender(name, merge, add_arguments=add_arguments)


if __name__ == "__main__":
    main()
