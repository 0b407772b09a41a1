"""The loopback S3 server of the ``memsafe_s3`` benchmark contenders.

``python -m benchmarks.s3`` is the server ``benchmarks.run`` starts when an S3 contender runs:
a ``ThreadedMotoServer`` on 127.0.0.1 with one bucket (:data:`BUCKET`), its endpoint printed
on the first stdout line, stopped when stdin closes. It runs in a process of its own, so the
objects it holds in memory count neither against a contender's peak RSS nor against a
contender's cgroup cap. The scenario itself (the upsert on S3 versus local disk, with peak
RSS and a cgroup cap) is ``make bench``'s: see ``benchmarks.run`` and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="serve S3 (the default)")
    parser.parse_args(argv)
    serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
