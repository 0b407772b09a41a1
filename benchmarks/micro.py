"""Micro-benchmarks, one variant per child process so each has its own peak RSS from the OS.

``python -m benchmarks.micro VARIANT --data DIR [...]`` runs one variant and prints a
``BENCH_RESULT`` JSON line. Variants:

- ``scan-raw`` / ``scan-memsafe``: count the rows of a dataset through a raw PyArrow scanner,
  or through ``process_in_chunks``, with the same chunk size (each in its own process: its
  peak RSS).
- ``scan-paired``: both scans alternated in one process, so throughput is compared under the
  same conditions (a separate process per variant lets machine noise decide the ratio).
- ``write-raw`` / ``write-memsafe``: write the same in-memory batches to one Parquet file with
  ``pq.ParquetWriter``, or with memsafe's ``ChunkedParquetWriter`` (what the IO manager uses).
- ``pressure``: microseconds per ``MemoryMonitor().check_memory_pressure()`` call.
- ``sampler``: CPU the background sampler (``monitor.start_sampling(0.1)``) costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from benchmarks.contenders._common import RESULT_MARKER
from benchmarks.datagen import ROW_GROUP_ROWS

COMPRESSION = "zstd"


def _timed_runs(work: Callable[[], int], repeat: int) -> dict[str, Any]:
    """Run ``work`` (returning a row count) ``repeat`` times; median seconds and rows/s."""
    seconds = []
    rows = 0
    for _ in range(repeat):
        started = time.perf_counter()
        rows = work()
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return {"rows": rows, "seconds": seconds, "median_s": median, "rows_per_s": rows / median}


# -- scans --------------------------------------------------------------------------------------


def scan_raw(data: Path, chunk_rows: int) -> int:
    """Count rows through a plain PyArrow scanner (default readahead)."""
    scanner = ds.dataset(data, format="parquet").scanner(batch_size=chunk_rows)
    return sum(batch.num_rows for batch in scanner.to_batches())


def scan_memsafe(data: Path, chunk_rows: int) -> int:
    """Count rows through memsafe's adaptive ``process_in_chunks``."""
    from memsafe_dagster.datasets import process_in_chunks

    return sum(chunk.num_rows for chunk in process_in_chunks(str(data), chunk_size_rows=chunk_rows))


def scan_paired(data: Path, chunk_rows: int, repeat: int) -> dict[str, Any]:
    """Raw and memsafe scans alternated (order flipped each round); medians and the median of
    the per-round ratios of memsafe's rows/s to raw's."""
    seconds: dict[str, list[float]] = {"raw": [], "memsafe": []}
    scans = {"raw": scan_raw, "memsafe": scan_memsafe}
    rows = 0
    for round_ in range(repeat):
        order = ("raw", "memsafe") if round_ % 2 else ("memsafe", "raw")
        for name in order:
            started = time.perf_counter()
            rows = scans[name](data, chunk_rows)
            seconds[name].append(time.perf_counter() - started)
    ratios = [r / m for r, m in zip(seconds["raw"], seconds["memsafe"], strict=True)]
    return {
        "rows": rows,
        "rounds": repeat,
        "raw_median_s": statistics.median(seconds["raw"]),
        "memsafe_median_s": statistics.median(seconds["memsafe"]),
        "paired_ratio": statistics.median(ratios),
        "seconds": seconds,
    }


# -- writes -------------------------------------------------------------------------------------


def write_with_raw_writer(batches: Iterable[pa.RecordBatch], schema: pa.Schema, path: Path) -> int:
    """Write ``batches`` to ``path`` with ``pq.ParquetWriter``; returns the rows written."""
    rows = 0
    with pq.ParquetWriter(path, schema, compression=COMPRESSION) as writer:
        for batch in batches:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def write_with_memsafe_writer(batches: Iterable[pa.RecordBatch], path: Path) -> int:
    """Write ``batches`` to ``path`` with memsafe's ``ChunkedParquetWriter`` (the IO manager's
    streaming writer); returns the rows written."""
    from memsafe_dagster.datasets import ChunkedParquetWriter

    rows = 0
    with ChunkedParquetWriter(str(path), compression=COMPRESSION) as writer:
        for batch in batches:
            writer.write(batch)
            rows += batch.num_rows
    return rows


def _write_variant(data: Path, repeat: int, memsafe: bool) -> dict[str, Any]:
    table = ds.dataset(data, format="parquet").to_table()
    batches = table.to_batches(max_chunksize=ROW_GROUP_ROWS)
    with tempfile.TemporaryDirectory(prefix="memsafe-bench-write-") as tmp:
        out = Path(tmp) / "out.parquet"

        def work() -> int:
            out.unlink(missing_ok=True)
            if memsafe:
                return write_with_memsafe_writer(batches, out)
            return write_with_raw_writer(batches, table.schema, out)

        result = _timed_runs(work, repeat)
        result["file_bytes"] = out.stat().st_size
    return result


# -- monitor ------------------------------------------------------------------------------------


def pressure_cost(calls: int, repeat: int) -> dict[str, Any]:
    """Microseconds per ``check_memory_pressure()``: median over ``repeat`` batches of calls."""
    from memsafe_dagster.memory import MemoryMonitor

    monitor = MemoryMonitor()
    for _ in range(10):
        monitor.check_memory_pressure()
    per_call = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(calls):
            monitor.check_memory_pressure()
        per_call.append((time.perf_counter() - started) / calls * 1e6)
    return {"calls": calls * repeat, "us_per_call": statistics.median(per_call), "runs": per_call}


def sampler_cost(seconds: float, interval_s: float) -> dict[str, Any]:
    """CPU seconds the background sampler's thread used over ``seconds`` of wall time."""
    from memsafe_dagster.memory import MemoryMonitor

    monitor = MemoryMonitor()
    monitor.start_sampling(interval_s)
    sampler = monitor._sampler
    started = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - started
    cpu, samples = sampler.cpu_seconds, sampler.samples
    monitor.stop_sampling()
    return {
        "interval_s": interval_s,
        "wall_s": wall,
        "samples": samples,
        "cpu_s": cpu,
        "cpu_pct_of_core": 100 * cpu / wall,
        "us_cpu_per_sample": cpu / samples * 1e6 if samples else None,
    }


# -- command line -------------------------------------------------------------------------------

VARIANTS = (
    "scan-raw",
    "scan-memsafe",
    "scan-paired",
    "write-raw",
    "write-memsafe",
    "pressure",
    "sampler",
)


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """Dispatch one variant."""
    if args.variant == "scan-raw":
        return _timed_runs(lambda: scan_raw(args.data, args.chunk_rows), args.repeat)
    if args.variant == "scan-memsafe":
        return _timed_runs(lambda: scan_memsafe(args.data, args.chunk_rows), args.repeat)
    if args.variant == "scan-paired":
        return scan_paired(args.data, args.chunk_rows, args.repeat)
    if args.variant in ("write-raw", "write-memsafe"):
        return _write_variant(args.data, args.repeat, memsafe=args.variant == "write-memsafe")
    if args.variant == "pressure":
        return pressure_cost(args.calls, args.repeat)
    return sampler_cost(args.seconds, args.interval)


def main(argv: list[str] | None = None) -> None:
    """Run one variant and print its report."""
    parser = argparse.ArgumentParser(prog="benchmarks.micro")
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--data", type=Path, help="Parquet dataset (scan and write variants)")
    parser.add_argument("--chunk-rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1000, help="pressure: calls per run")
    parser.add_argument("--seconds", type=float, default=3.0, help="sampler: how long to run")
    parser.add_argument("--interval", type=float, default=0.1, help="sampler: interval")
    args = parser.parse_args(argv)
    if args.variant.startswith(("scan", "write")) and args.data is None:
        parser.error(f"{args.variant} needs --data")
    print(RESULT_MARKER + json.dumps(run_variant(args)), flush=True)


if __name__ == "__main__":
    main()
