"""A lock left by a writer on another host: broken once its lease expired, never while it lives.

The other host is a real process in its own UTS namespace (``unshare --uts`` as root) with
another hostname: it opens a transaction on the target (lock taken, lease renewed by its
thread, a file staged) and then waits. While it lives, a writer on this host waits and is
refused with an error naming that host (the positive control: a live lease is never broken).
After ``kill -9`` the next writer here breaks the lock once the lease expired, warns naming
the other host, recovers the orphaned staging and commits; the dead writer's PID means
nothing here (another host's PIDs are not ours), only its lease does. On local disk and on
S3 (loopback moto). That the holder which lost its lease cannot commit afterwards is
``test_s3_commit.py::test_a_writer_whose_lock_was_lost_cannot_commit``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import s3_helpers
from merge_helpers import leftover_state
from s3_helpers import new_bucket, storage_options

from memsafe_dagster.datasets import DatasetLockedError, PyarrowDatasetIO

LEASE_S = 2.0
ROOM = {"merge_min_system_available_mb": 0}

HOLDER = """
import json, os, socket, sys, time
from memsafe_dagster.datasets import commit
from memsafe_dagster.datasets.filesystem import resolve_filesystem

fs, target = resolve_filesystem(sys.argv[1], storage_options=json.loads(sys.argv[2]))
txn = commit.DatasetTransaction(fs, target, operation="merge", lock_timeout_s=30)
txn.__enter__()
fs.pipe_file(txn.new_file(), b"staged by the writer on the other host, never committed")
print("LOCKED", os.getpid(), socket.gethostname(), flush=True)
time.sleep(600)
"""


def _unshare_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root: a child with another hostname runs in its own UTS namespace"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "--uts", "--fork", "sh", "-c", "hostname memsafe-probe && hostname"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0 or probe.stdout.strip() != "memsafe-probe":
        return f"unshare --uts does not work here: {probe.stderr.strip() or probe.stdout.strip()}"
    return None


_PROBLEM = _unshare_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


class OtherHostWriter:
    """The holder: a Python process under ``unshare --uts`` with hostname ``host``."""

    def __init__(self, url: str, options: dict, host: str) -> None:
        self.host = host
        script = 'hostname "$1" && shift && exec "$@"'
        argv = [sys.executable, "-c", HOLDER, url, json.dumps(options)]
        env = {**os.environ, "MEMSAFE_LEASE_S": str(LEASE_S)}
        self.proc = subprocess.Popen(
            ["unshare", "--uts", "--fork", "sh", "-c", script, "sh", host, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()  # blocks until the lock is held
        if not line or line[0] != "LOCKED":
            self.kill()
            raise AssertionError(f"the holder did not take the lock: {self.proc.stderr.read()}")
        self.pid, seen = int(line[1]), line[2]
        assert seen == host and seen != os.uname().nodename

    def kill(self) -> None:
        """``kill -9`` the holder (its lease thread dies with it), then reap ``unshare``."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


_table, _rows = s3_helpers.kv_table, s3_helpers.kv_rows


def _state_files(io: PyarrowDatasetIO, url: str) -> list[str]:
    """What is left under ``_memsafe`` besides the dataset's history (log and trash)."""
    fs, target = io.resolve(url)
    return leftover_state(target, fs)


def _check(io: PyarrowDatasetIO, url: str, options: dict, caplog, trials: int) -> None:
    io.write_dataset(_table(range(3), "base"), url)
    fs, target = io.resolve(url)
    expected = [(0, "base"), (1, "base"), (2, "base")]
    for trial in range(trials):
        host = f"other-host-{uuid.uuid4().hex[:6]}"
        holder = OtherHostWriter(url, options, host)
        try:
            if trial == 0:  # positive control: a live holder, renewing, is never broken
                started = time.monotonic()
                with pytest.raises(DatasetLockedError, match=host):
                    io.merge(_table([7], "here"), url, "upsert", "k", lock_timeout_s=3, **ROOM)
                assert time.monotonic() - started >= 3 > LEASE_S  # outlived a lease: renewed
                assert holder.proc.poll() is None
                assert _rows(io, url) == expected
            time.sleep(random.uniform(0, LEASE_S / 2))  # kill -9 at any point of a lease
        finally:
            holder.kill()
        lease = json.loads(fs.cat_file(f"{target.rstrip('/')}/_memsafe/lock"))
        assert lease["host"] == host and lease["pid"] == holder.pid
        caplog.clear()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="memsafe_dagster.datasets.commit"):
            io.merge(_table([10 + trial], "here"), url, "upsert", "k", lock_timeout_s=10, **ROOM)
        waited = time.monotonic() - started
        expected.append((10 + trial, "here"))
        assert _rows(io, url) == expected
        broken = [r.getMessage() for r in caplog.records if "breaking stale lock" in r.message]
        assert len(broken) == 1 and host in broken[0], caplog.text
        assert f"pid {holder.pid} on {host}" in broken[0]
        assert time.time() >= lease["expires_at"]  # not before the lease ran out
        # another host's lock waits out its lease (a dead pid on this host is broken at once)
        assert waited <= LEASE_S + 5, waited
        assert _state_files(io, url) == []  # the dead writer's staging was recovered


def test_a_dead_writer_on_another_host_local_disk(tmp_path, caplog):
    io = PyarrowDatasetIO()
    _check(io, str(tmp_path / "t"), {}, caplog, trials=3)


@pytest.fixture(scope="module")
def endpoint():
    with s3_helpers.loopback_s3() as url:
        yield url


def test_a_dead_writer_on_another_host_s3(endpoint, caplog):
    options = storage_options(endpoint)
    io = PyarrowDatasetIO(storage_options=options)
    _check(io, f"s3://{new_bucket(endpoint)}/t", options, caplog, trials=3)
