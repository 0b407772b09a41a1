"""A script that reads from S3 exits cleanly: PyArrow lets go of its Python-backed files before
the interpreter finalizes (``datasets.python_files``).

Without the exit hook a read from the loopback S3 server ended in SIGABRT ("terminate called
without an active exception") in 4 of 40 processes; the subprocess test runs 24.
"""

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import s3_helpers

from memsafe_dagster.datasets import python_files

SCRIPT = """
import os
import pyarrow as pa
from memsafe_dagster.datasets import PyarrowDatasetIO

io = PyarrowDatasetIO(storage_options={"client_kwargs": {"endpoint_url": os.environ["EP"]}})
url = f"s3://{os.environ['BUCKET']}/t"
io.write_dataset(pa.table({"id": [1, 2, 3]}), url)
print(sum(t.num_rows for t in io.stream(url)), io.read(url).num_rows)  # the scan last
"""


class _File:
    """A stand-in for an fsspec file (weak-referenceable, like them)."""


def test_the_exit_wait_lasts_until_a_worker_drops_the_last_file() -> None:
    held = [_File()]
    python_files.python_file(held[0])  # the PythonFile itself is dropped at once
    assert python_files.open_count() >= 1

    def drop_later() -> None:
        time.sleep(0.2)
        held.clear()  # what PyArrow's worker does once it disposes of a scan

    worker = threading.Thread(target=drop_later)
    started = time.monotonic()
    worker.start()
    left = python_files.wait_for_release(quiet_s=0.02, settle_s=1.0, max_wait_s=5)
    worker.join()
    assert left == 0
    assert time.monotonic() - started >= 0.2  # it waited for the worker


def test_the_exit_wait_gives_up_on_a_file_the_program_still_holds() -> None:
    kept = _File()
    python_files.python_file(kept)
    started = time.monotonic()
    assert python_files.wait_for_release(quiet_s=0.02, settle_s=0.1, max_wait_s=5) >= 1
    assert time.monotonic() - started < 1.0  # the settle time, not the whole maximum
    del kept


@pytest.fixture(scope="module")
def endpoint():
    with s3_helpers.loopback_s3() as url:
        yield url


def test_scripts_that_read_from_s3_exit_with_status_zero(endpoint: str) -> None:
    def run(_: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "EP": endpoint, "BUCKET": s3_helpers.new_bucket(endpoint)}
        return subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
        )

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(run, range(24)))
    for r in runs:
        assert r.stdout.split() == ["3", "3"], r.stderr[-2000:]
    failed = [(r.returncode, r.stderr[-300:]) for r in runs if r.returncode != 0]
    assert not failed, failed
