"""memsafe-dagster on S3: the ``memsafe`` contender's upsert into a target in a bucket of the
loopback moto server that ``benchmarks.run`` starts (``benchmarks.s3 --serve``).

Untimed before the merge: the target's files are uploaded one file at a time. Timed:
``PyarrowDatasetIO.merge`` of the local source into the ``s3://`` target (every target file the
merge reads, rewrites and commits goes through S3) with the same memory parameters as the local
contender. The source stays on local disk: on this branch an ``s3://`` source is resolved
without the target's ``storage_options`` (issue 13, item 3).

Untimed after it: the merged target is downloaded to ``--out`` (the runner verifies it there)
and its prefix deleted, so the server's memory does not grow from run to run. Peak RSS covers
the whole process, uploads and downloads included (they stream file by file).

``--block-size-mb`` sets s3fs's ``default_block_size`` (the buffer of every file it opens for
writing and its read-ahead block; s3fs's default is 50 MB, memsafe's 8 MiB) in the merge's
``storage_options``.
"""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path
from typing import Any

from benchmarks.contenders._common import run_contender
from benchmarks.contenders.memsafe import add_arguments as add_memsafe_arguments
from benchmarks.contenders.memsafe import upsert
from benchmarks.s3 import AWS_ENV, BUCKET, ENDPOINT_ENV, storage_options

CHUNK = 8 * 2**20  # upload/download piece size: keeps the untimed phases' memory small


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_memsafe_arguments(parser)
    parser.add_argument(
        "--block-size-mb",
        type=float,
        help="s3fs default_block_size for the merge's files (default: memsafe's, 8 MiB)",
    )


def _filesystem(args: argparse.Namespace):  # -> s3fs.S3FileSystem
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **args.storage_options)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def prepare(args: argparse.Namespace) -> None:
    """Upload the target to a fresh prefix of the bucket."""
    endpoint = os.environ.get(ENDPOINT_ENV)
    if not endpoint:
        raise SystemExit(f"{ENDPOINT_ENV} is not set: run this contender through benchmarks.run")
    for key, value in AWS_ENV.items():
        os.environ.setdefault(key, value)
    args.storage_options = storage_options(endpoint)
    if args.block_size_mb is not None:
        args.storage_options["default_block_size"] = int(args.block_size_mb * 2**20)
    args.prefix = f"{BUCKET}/{args.out.name}-{uuid.uuid4().hex[:8]}"
    fs = _filesystem(args)
    for path in _files(args.target):
        remote = f"{args.prefix}/target/{path.relative_to(args.target).as_posix()}"
        fs.put_file(str(path), remote, chunksize=CHUNK)


def _vm_hwm_mb() -> float:
    """This process's RSS high-water mark so far, from the kernel (VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """The timed merge into the S3 target; the details are the engine's own ``MergeResult``
    and the kernel's RSS high-water mark before and after it (which phase set the peak)."""
    before = _vm_hwm_mb()
    details = upsert(
        args,
        args.source.resolve().as_uri(),  # file://: the S3 storage_options resolve it locally
        f"s3://{args.prefix}/target",
        storage_options=args.storage_options,
    )
    return {**details, "vm_hwm_before_merge_mb": before, "vm_hwm_after_merge_mb": _vm_hwm_mb()}


def finish(args: argparse.Namespace) -> None:
    """Download the merged target's data files to ``--out``; delete the run's prefix."""
    fs = _filesystem(args)
    root = f"{args.prefix}/target"
    args.out.mkdir(parents=True)
    for remote in fs.find(root):
        relative = remote[len(root) + 1 :]
        if relative.startswith("_memsafe/"):
            continue
        local = args.out / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        with fs.open(remote, "rb", block_size=CHUNK) as src, open(local, "wb") as dst:
            while piece := src.read(CHUNK):
                dst.write(piece)
    fs.rm(args.prefix, recursive=True)


if __name__ == "__main__":
    run_contender("memsafe_s3", merge, prepare=prepare, finish=finish, add_arguments=add_arguments)
