"""What every contender shares: its command line, the untimed copy, the timed merge, the report.

A contender module defines ``merge(args) -> dict`` (the timed upsert, returning details to
report), optionally ``prepare(args)`` (untimed work such as copying a target it mutates) and
``finish(args)`` (untimed work after the merge, such as bringing a remote output to ``--out``
for verification), then calls :func:`run_contender`. The last stdout line starting with
:data:`RESULT_MARKER` carries the JSON report the runner reads; :data:`PHASE_MARKER` lines say
which phase is running, so a run killed midway can be blamed on the right one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

RESULT_MARKER = "BENCH_RESULT "
PHASE_MARKER = "BENCH_PHASE "
KEY = "id"

OutputFormat = Literal["parquet", "delta", "iceberg"]
Merge = Callable[[argparse.Namespace], dict[str, Any]]
Prepare = Callable[[argparse.Namespace], None]
AddArguments = Callable[[argparse.ArgumentParser], None]


def copy_target(args: argparse.Namespace) -> None:
    """Copy the target dataset to ``--out`` so an in-place merge leaves the cache intact."""
    shutil.copytree(args.target, args.out)


def parquet_files(directory: Path) -> list[Path]:
    """The Parquet files directly under ``directory``, in name order (at least one)."""
    files = sorted(directory.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no *.parquet files in {directory}")
    return files


def run_contender(
    name: str,
    merge: Merge,
    *,
    prepare: Prepare | None = None,
    finish: Prepare | None = None,
    add_arguments: AddArguments | None = None,
    output_format: OutputFormat = "parquet",
    argv: list[str] | None = None,
) -> None:
    """Parse the common arguments, prepare (untimed), time ``merge``, finish (untimed) and print
    the report."""
    parser = argparse.ArgumentParser(prog=f"benchmarks.contenders.{name}")
    parser.add_argument("--target", type=Path, required=True, help="target Parquet directory")
    parser.add_argument("--source", type=Path, required=True, help="source Parquet directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"--out {args.out} already exists")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if prepare is not None:
        print(PHASE_MARKER + "prepare", flush=True)
        prepare(args)
    # The untimed preparation's dirty pages (a copied target) must not be written back inside
    # the timed merge: that would charge one contender for I/O the others never do.
    os.sync()
    print(PHASE_MARKER + "merge", flush=True)
    started = time.perf_counter()
    details = merge(args)
    merge_s = time.perf_counter() - started
    if finish is not None:
        print(PHASE_MARKER + "finish", flush=True)
        finish(args)
    report = {
        "contender": name,
        "merge_s": round(merge_s, 4),
        "output": str(args.out),
        "format": output_format,
        "details": details,
    }
    print(RESULT_MARKER + json.dumps(report, default=str), flush=True)
