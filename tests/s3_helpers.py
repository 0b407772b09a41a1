"""A real S3 API on loopback for the object-storage tests: moto's ThreadedMotoServer on
127.0.0.1 (random port), requests served one at a time (stock moto checks ``If-None-Match``
and then writes, which races under its threaded server; real S3 is atomic), and helpers to
make a bucket and the s3fs storage options that point at it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")


class _Serialized:
    """One request at a time: stock moto's conditional writes race under its threaded server."""

    def __init__(self, app) -> None:
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            return list(self.app(environ, start_response))


class LockedMotoServer(moto_server.ThreadedMotoServer):
    def _server_entry(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        app = _Serialized(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def start_server() -> tuple[LockedMotoServer, str]:
    server = LockedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@contextmanager
def loopback_s3(env: Mapping[str, str] | None = None) -> Iterator[str]:
    """A loopback S3 server with the test credentials (and ``env``) in the environment;
    yields its endpoint. For a module-scoped fixture: ``with loopback_s3() as url: yield url``."""
    mp = pytest.MonkeyPatch()
    for k, v in {**AWS_ENV, **(env or {})}.items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    server, url = start_server()
    try:
        yield url
    finally:
        server.stop()
        mp.undo()


def storage_options(endpoint: str) -> dict:
    """s3fs options for the loopback server; credentials come from the AWS env vars."""
    return {"client_kwargs": {"endpoint_url": endpoint}, "use_listings_cache": False}


def new_bucket(endpoint: str) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def s3fs_for(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **storage_options(endpoint))


README = Path(__file__).resolve().parent.parent / "README.md"


def run_readme_block(
    endpoint: str, *markers: str, env: Mapping[str, str], cwd: Path
) -> subprocess.CompletedProcess:
    """Run the README's one Python block holding every marker, in a fresh interpreter that
    imports this checkout, with the test credentials, ``AWS_ENDPOINT_URL`` and ``env``."""
    [block] = [
        b
        for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
        if all(m in b for m in markers)
    ]
    path = os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")])
    full = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": endpoint, "PYTHONPATH": path, **env}
    full.pop("AWS_MAX_ATTEMPTS", None)
    return subprocess.run(
        [sys.executable, "-c", block],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


def kv_table(keys, value):
    """A table of int64 keys ``k`` and one value ``v`` for every row."""
    import pyarrow as pa

    keys = list(keys)
    return pa.table({"k": pa.array(keys, pa.int64()), "v": pa.array([value] * len(keys))})


def kv_rows(io, url: str) -> list[tuple[int, str]]:
    """The (k, v) rows of the dataset at ``url``, sorted."""
    t = io.read(url)
    return sorted(zip(t.column("k").to_pylist(), t.column("v").to_pylist(), strict=True))
