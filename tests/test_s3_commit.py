"""Concurrent writers, the fence, leases and kill -9 on a real loopback S3 API (moto).

The commit point is an exclusive create of ``_memsafe/log/<version>.json`` (``If-None-Match:
*`` on S3); these tests check it with the lock working, with the lock disabled (so only the
fence keeps writers apart), with a stale lock from another host, and with writers SIGKILLed at
every step of the commit.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest
import s3_helpers
from s3_helpers import new_bucket, s3fs_for, storage_options

from memsafe_dagster.datasets import (
    CommitConflictError,
    DatasetLockedError,
    PyarrowDatasetIO,
    commit,
)

ROOM = {"merge_min_system_available_mb": 0}
CTX = multiprocessing.get_context("fork")


@pytest.fixture(scope="module")
def endpoint():
    with s3_helpers.loopback_s3() as url:
        yield url


def _io(endpoint: str) -> PyarrowDatasetIO:
    return PyarrowDatasetIO(storage_options=storage_options(endpoint))


_table, _rows = s3_helpers.kv_table, s3_helpers.kv_rows


def test_every_strategy_on_s3(endpoint):
    io = _io(endpoint)
    url = f"s3://{new_bucket(endpoint)}/t"
    io.write_dataset(_table(range(10), "a"), url)
    cases = [
        ("upsert", range(5, 15), "b"),
        ("insert", range(12, 20), "c"),
        ("update", range(0, 3), "d"),
        ("delete", range(18, 30), "x"),
    ]
    expected = dict.fromkeys(range(10), "a")
    for strategy, keys, value in cases:
        io.merge(_table(keys, value), url, strategy, "k", **ROOM)
        for k in keys:
            if strategy == "upsert" or (strategy == "update" and k in expected):
                expected[k] = value
            elif strategy == "insert":
                expected.setdefault(k, value)
            elif strategy == "delete":
                expected.pop(k, None)
        assert _rows(io, url) == sorted(expected.items()), strategy
    io.merge(_table(range(3), "z"), url, "full_merge", "k", **ROOM)
    assert _rows(io, url) == [(0, "z"), (1, "z"), (2, "z")]
    assert commit.latest_version(s3fs_for(endpoint), url[len("s3://") :]) == 6


def test_a_writer_whose_lock_was_lost_cannot_commit(endpoint):
    fs = s3fs_for(endpoint)
    io = _io(endpoint)
    url = f"s3://{new_bucket(endpoint)}/t"
    io.write_dataset(_table(range(4), "base"), url)
    target = url[len("s3://") :]
    with commit.DatasetTransaction(fs, target, operation="test") as slow:
        path = slow.new_file()
        fs.pipe_file(path, b"not parquet, never published")
        fs.rm_file(slow.lock.path)  # the slow writer's lease is broken behind its back
        io.merge(_table([9], "fast"), url, "upsert", "k", **ROOM)
        with pytest.raises(CommitConflictError, match="another writer committed"):
            slow.commit()
    assert _rows(io, url) == [(0, "base"), (1, "base"), (2, "base"), (3, "base"), (9, "fast")]
    assert not [p for p in fs.find(f"{target}/_memsafe") if "/log/" not in p]


def _worker(endpoint: str, url: str, i: int, no_lock: bool, out) -> None:
    if no_lock:
        # Every writer believes it holds the lock (as after lost leases) and skips the
        # recovery that only a lock holder may run: only the fence keeps them apart.
        commit.DatasetLock._try_create = lambda self: True
        commit._recover_locked = lambda fs, target: commit.RecoveryReport()
    io = _io(endpoint)
    keys = list(range(10)) + list(range(100 * (i + 1), 100 * (i + 1) + 5))
    try:
        io.merge(_table(keys, f"w{i}"), url, "upsert", "k", lock_timeout_s=60, **ROOM)
        out.put((i, "ok"))
    except CommitConflictError:
        out.put((i, "conflict"))
    except Exception as exc:
        out.put((i, f"error {type(exc).__name__}: {exc}"))


@pytest.mark.parametrize(("no_lock", "trials"), [(False, 8), (True, 20)])
def test_concurrent_upserts_lose_and_duplicate_nothing(endpoint, no_lock, trials):
    io = _io(endpoint)
    bucket = new_bucket(endpoint)
    conflicts = 0
    for trial in range(trials):
        url = f"s3://{bucket}/t{trial}"
        io.write_dataset(_table(range(10), "base"), url)
        out = CTX.Queue()
        procs = [
            CTX.Process(target=_worker, args=(endpoint, url, i, no_lock, out)) for i in range(3)
        ]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(30)
        errors = [r for r in results.values() if r.startswith("error")]
        if no_lock:
            # Without the lock a loser may also trip over files the winner's commit removed
            # or staging its recovery swept: it fails, and must then have committed nothing.
            vanished = ("FileNotFoundError", "CommitError", "does not exist", "not a readable")
            errors = [r for r in errors if not any(v in r for v in vanished)]
        assert not errors, results
        ok = [i for i, r in results.items() if r == "ok"]
        conflicts += len(results) - len(ok)
        assert ok or no_lock, results
        rows = _rows(io, url)
        keys = [k for k, _ in rows]
        assert len(keys) == len(set(keys)), f"trial {trial}: duplicated rows {rows}"
        expected_keys = set(range(10))
        for i in ok:
            expected_keys |= set(range(100 * (i + 1), 100 * (i + 1) + 5))
        assert set(keys) == expected_keys, f"trial {trial}: lost or extra rows {results} {rows}"
        common = {v for k, v in rows if k < 10}
        assert len(common) == 1 and common <= ({f"w{i}" for i in ok} or {"base"})
    print(
        f"{trials} trials of 3 concurrent upserts (no_lock={no_lock}): 0 duplicated, "
        f"0 lost, {conflicts} writers refused"
    )
    if not no_lock:
        assert conflicts == 0  # with a working lock, writers queue instead


def _write_foreign_lock(fs, target: str, expires_at: float) -> None:
    record = {
        "token": "x",
        "pid": 1,
        "host": "another-host-pod-7",
        "acquired_at": time.time(),
        "lease_s": 30,
        "expires_at": expires_at,
    }
    fs.pipe_file(f"{target}/_memsafe/lock", json.dumps(record).encode())


def test_a_stale_lock_from_another_host_is_broken_a_live_one_is_not(endpoint, caplog):
    fs = s3fs_for(endpoint)
    io = _io(endpoint)
    url = f"s3://{new_bucket(endpoint)}/t"
    target = url[len("s3://") :]
    io.write_dataset(_table(range(3), "a"), url)
    _write_foreign_lock(fs, target, time.time() + 60)  # negative control: lease still valid
    with pytest.raises(DatasetLockedError, match="another-host-pod-7"):
        io.merge(_table([5], "b"), url, "upsert", "k", lock_timeout_s=1, **ROOM)
    _write_foreign_lock(fs, target, time.time() - 1)  # the pod died: its lease expired
    with caplog.at_level("WARNING"):
        io.merge(_table([5], "b"), url, "upsert", "k", lock_timeout_s=5, **ROOM)
    assert "breaking stale lock" in caplog.text
    assert _rows(io, url) == [(0, "a"), (1, "a"), (2, "a"), (5, "b")]


def test_the_lease_is_renewed_while_the_holder_works(endpoint):
    fs = s3fs_for(endpoint)
    target = f"{new_bucket(endpoint)}/t"
    lock = commit.DatasetLock(fs, target, lease_s=0.6)
    with lock:
        first = json.loads(fs.cat_file(lock.path))["expires_at"]
        time.sleep(0.8)
        second = json.loads(fs.cat_file(lock.path))["expires_at"]
        assert second > first + 0.1  # renewed, so another host never sees it expired
        other = commit.DatasetLock(fs, target, timeout_s=0.3)
        with pytest.raises(DatasetLockedError):
            other.acquire()
    assert not fs.exists(lock.path)


def _crash_worker(endpoint: str, url: str, point: str) -> None:
    os.environ[commit.CRASH_ENV] = point
    _io(endpoint).merge(_table(range(5, 15), "new"), url, "upsert", "k", **ROOM)
    os._exit(0)


@pytest.mark.parametrize("point", commit.CRASH_POINTS)
def test_kill_9_at_every_commit_step_on_s3(endpoint, point):
    io = _io(endpoint)
    url = f"s3://{new_bucket(endpoint)}/t"
    io.write_dataset(_table(range(10), "old"), url)
    before = _rows(io, url)
    after = sorted({**dict(before), **dict.fromkeys(range(5, 15), "new")}.items())
    p = CTX.Process(target=_crash_worker, args=(endpoint, url, point))
    p.start()
    p.join(60)
    assert p.exitcode == -9
    state = _rows(io, url)  # reads recover first
    assert state in (before, after), point
    if point != "commit-staged":
        assert state == after
    # the next writer proceeds without flags (the dead holder's lock is broken: same host)
    io.merge(_table([99], "next"), url, "upsert", "k", lock_timeout_s=10, **ROOM)
    assert (99, "next") in _rows(io, url)


def test_cli_merge_and_recover_on_s3_with_storage_options(endpoint, tmp_path):
    import pyarrow.parquet as pq

    from memsafe_dagster.cli import main

    io = _io(endpoint)
    url = f"s3://{new_bucket(endpoint)}/t"
    io.write_dataset(_table(range(3), "a"), url)
    src = tmp_path / "src.parquet"
    pq.write_table(_table([2, 7], "cli"), src)
    opt = f"client_kwargs.endpoint_url={endpoint}"
    assert (
        main(
            [
                "merge",
                str(src),
                url,
                "--key",
                "k",
                "--storage-option",
                opt,
                "--min-available",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert _rows(io, url) == [(0, "a"), (1, "a"), (2, "cli"), (7, "cli")]
    assert main(["recover", url, "--storage-option", opt]) == 0
    assert main(["recover", url, "--storage-option", "no-equals-sign"]) == 2  # control


def test_the_readme_s3_example_runs(endpoint, tmp_path):
    env = {"MEMSAFE_BUCKET": new_bucket(endpoint), "MEMSAFE_MEMORY_LIMIT": "4g"}
    run = s3_helpers.run_readme_block(endpoint, "MEMSAFE_BUCKET", env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == "3"


def _term_worker(endpoint: str, url: str, ready) -> None:
    ready.set()
    _io(endpoint).merge(_table(range(5, 15), "new"), url, "upsert", "k", **ROOM)
    os._exit(0)


def test_sigterm_at_random_instants_leaves_before_or_after_on_s3(endpoint):
    import random
    import signal

    io = _io(endpoint)
    bucket = new_bucket(endpoint)
    rng = random.Random(13)
    outcomes = {"before": 0, "after": 0}
    for trial in range(12):
        url = f"s3://{bucket}/t{trial}"
        io.write_dataset(_table(range(10), "old"), url)
        before = _rows(io, url)
        after = sorted({**dict(before), **dict.fromkeys(range(5, 15), "new")}.items())
        ready = CTX.Event()
        p = CTX.Process(target=_term_worker, args=(endpoint, url, ready))
        p.start()
        ready.wait(10)
        time.sleep(rng.uniform(0.0, 1.5))
        os.kill(p.pid, signal.SIGTERM)
        p.join(60)
        state = _rows(io, url)
        assert state in (before, after), trial
        outcomes["before" if state == before else "after"] += 1
        io.merge(_table([99], "next"), url, "upsert", "k", lock_timeout_s=10, **ROOM)
        assert (99, "next") in _rows(io, url)
    print(f"12 SIGTERM trials on S3: {outcomes}")


def test_merge_asset_with_s3_inbox_and_target_keeps_secrets_out_of_metadata(endpoint, tmp_path):
    import dagster as dg
    import pyarrow.parquet as pq

    from memsafe_dagster import build_merge_asset
    from memsafe_dagster.io_managers import ChunkedParquetIOManager
    from memsafe_dagster.resources import MemoryMonitorResource

    secret = "s3cr3t-" + os.urandom(4).hex()
    options = {**storage_options(endpoint), "key": "testing", "secret": secret}
    fs = s3fs_for(endpoint)
    bucket = new_bucket(endpoint)
    with fs.open(f"{bucket}/inbox/a.parquet", "wb") as fh:
        pq.write_table(_table(range(6), "inbox"), fh)
    merged = build_merge_asset(
        "s3_customers",
        source=f"s3://{bucket}/inbox",
        target_path=f"s3://{bucket}/customers",
        key_columns="k",
        storage_options=options,
    )
    instance = dg.DagsterInstance.ephemeral()
    res = {
        "io_manager": ChunkedParquetIOManager(base_path=str(tmp_path / "io")),
        "memory": MemoryMonitorResource(min_system_available_mb=0),
    }
    assert dg.materialize([merged], resources=res, instance=instance).success
    io = PyarrowDatasetIO(storage_options=options)
    assert _rows(io, f"s3://{bucket}/customers") == [(k, "inbox") for k in range(6)]
    records = instance.fetch_materializations(merged.key, limit=100).records
    text = json.dumps([str(r.event_log_entry.dagster_event.event_specific_data) for r in records])
    assert "memsafe/merge" in text  # positive control: the metadata is there
    assert secret not in text and secret not in repr(merged)
