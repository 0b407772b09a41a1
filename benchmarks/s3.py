"""The upsert scenario on object storage: a loopback moto S3 server versus local disk.

``python -m benchmarks.s3 --rows 10000000 --source-rows 1000000`` writes a target of
``--rows`` rows and upserts ``--source-rows`` (half updates, half inserts) into it, once on a
local directory and once in a bucket of a ``ThreadedMotoServer`` on 127.0.0.1, each merge in
its own child process; prints one JSON line per backend with the merge time, the child's peak
RSS and the merge's own figures, and checks the row count. Needs ``moto[server]`` and s3fs.

``python -m benchmarks.s3 --serve`` is the server ``benchmarks.run`` starts for its
``memsafe_s3`` contender: a ``ThreadedMotoServer`` with one bucket (:data:`BUCKET`), its
endpoint printed on the first stdout line, stopped when stdin closes. It runs in a process of
its own, so the objects it holds in memory count neither against a contender's peak RSS nor
against a contender's cgroup cap.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the runner imports this module's constants and must stay small
    import pyarrow as pa

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "bench"
ENDPOINT_ENV = "MEMSAFE_BENCH_S3_ENDPOINT"
ENDPOINT_MARKER = "S3_ENDPOINT "


def storage_options(endpoint: str) -> dict:
    """s3fs options for the loopback server (credentials come from :data:`AWS_ENV`)."""
    return {"client_kwargs": {"endpoint_url": endpoint}, "use_listings_cache": False}


def serve() -> None:
    """Serve S3 on 127.0.0.1 with :data:`BUCKET` made; print the endpoint; stop at stdin EOF."""
    os.environ.update(AWS_ENV)
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        print(ENDPOINT_MARKER + endpoint, flush=True)
        sys.stdin.read()
    finally:
        server.stop()


def _table(start: int, stop: int, tag: str) -> pa.Table:
    import numpy as np
    import pyarrow as pa

    ids = np.arange(start, stop, dtype=np.int64)
    return pa.table({"id": ids, "x": ids * 2.5, "tag": pa.array([tag] * len(ids))})


def _merge_child(url: str, options: dict, rows: int, source_rows: int, budget_mb: int, out) -> None:
    from memsafe_dagster.datasets import PyarrowDatasetIO

    io = PyarrowDatasetIO(storage_options=options)
    source = _table(rows - source_rows // 2, rows + source_rows // 2, "new")
    started = time.perf_counter()
    result = io.merge(source, url, "upsert", "id", merge_max_memory_mb=budget_mb)
    elapsed = time.perf_counter() - started
    out.put(
        {
            "merge_s": round(elapsed, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rows_after": result.target_count_after,
            "files_rewritten": result.files_rewritten,
        }
    )


def run(url: str, options: dict, rows: int, source_rows: int, budget_mb: int) -> dict:
    from memsafe_dagster.datasets import PyarrowDatasetIO

    io = PyarrowDatasetIO(storage_options=options)
    step = 1_000_000
    for start in range(0, rows, step):
        io.write_dataset(_table(start, min(rows, start + step), "old"), url)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_merge_child, args=(url, options, rows, source_rows, budget_mb, out))
    p.start()
    figures = out.get(timeout=3600)
    p.join()
    expected = rows + source_rows // 2
    figures["verified"] = figures["rows_after"] == expected
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--source-rows", type=int, default=1_000_000)
    parser.add_argument("--budget-mb", type=int, default=512)
    parser.add_argument("--serve", action="store_true", help="only serve S3 (for benchmarks.run)")
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    os.environ.update(AWS_ENV)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        with tempfile.TemporaryDirectory() as tmp:
            backends = {
                "local": (os.path.join(tmp, "target"), {}),
                "s3-moto": (f"s3://{bucket}/target", {"client_kwargs": {"endpoint_url": endpoint}}),
            }
            for name, (url, options) in backends.items():
                figures = run(url, options, args.rows, args.source_rows, args.budget_mb)
                line = {"scenario": f"upsert {args.rows}/{args.source_rows}", "backend": name}
                print(json.dumps({**line, **figures}), flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
