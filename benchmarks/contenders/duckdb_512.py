"""DuckDB with ``SET memory_limit = '512MB'``; otherwise the same query as ``duckdb``."""

from benchmarks.contenders.duckdb import main

if __name__ == "__main__":
    main(memory_limit="512MB")
