"""Admission: the container-wide ledger across step processes, and what Dagster steps do with it.

The acceptance test runs three concurrent step processes (multiprocess executor, a real
instance) inside a real cgroup cap that cannot hold all three at once: with admission off the
kernel OOM-kills one (the positive control), with admission on the run completes.
"""

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from memsafe_dagster import MemoryMonitorResource
from memsafe_dagster.memory.admission import (
    AdmissionLedger,
    AdmissionTimeout,
    default_ledger_path,
    default_reservation_mb,
    expected_increment_mb,
)
from memsafe_dagster.memory.cgroup_cap import MemoryCap, run_measured
from memsafe_dagster.memory.limits import MemoryLimits, detect_memory_limits
from memsafe_dagster.memory.process import current_rss_bytes
from memsafe_dagster.memory.sizes import MiB

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _limits(extra_mb: float) -> MemoryLimits:
    """An env-style limit ``extra_mb`` above this process's RSS, with no cgroup to read."""
    return MemoryLimits(
        limit_bytes=int(current_rss_bytes() + extra_mb * MiB),
        source="env:MEMSAFE_MEMORY_LIMIT",
        physical_bytes=64 * 1024**3,
    )


# -- the acceptance test ----------------------------------------------------------------------


def _run_three_steps(admission: bool, cap_mb: int) -> tuple[dict, int, float]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)]),
        "MEMSAFE_TEST_ADMISSION": "1" if admission else "0",
        "MEMSAFE_TEST_ALLOC_MB": "300",
        "MEMSAFE_TEST_HOLD_S": "1.5",
        # A step process starts near 145 MB and touches 300 MB more.
        "MEMSAFE_TEST_EXPECTED_PEAK_MB": "480",
    }
    env.pop("MEMSAFE_ADMISSION_LEDGER", None)  # the ledger derived from the cap's cgroup
    with MemoryCap(f"{cap_mb}m") as cap:
        run = run_measured(
            [sys.executable, str(HERE / "dagster_defs_admission.py")],
            timeout_s=180,
            env=env,
            cwd=str(HERE),
            cap=cap,
        )
        kills = cap.oom_kills()
    assert not run.timed_out, run.stderr[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return report, kills, (run.cgroup_peak_bytes or 0) / MiB


def test_three_concurrent_steps_that_overflow_a_cgroup_cap_complete_with_admission(
    cgroup_caps: None,
) -> None:
    # Together: ~460 MB of step-process baselines plus 3 x 300 MB, over a 1000 MB cap.
    off, off_kills, off_peak = _run_three_steps(admission=False, cap_mb=1000)
    assert not off["success"], off
    assert off["failed"], off
    assert off_kills >= 1, (off, off_kills)

    on, on_kills, on_peak = _run_three_steps(admission=True, cap_mb=1000)
    assert on["success"], on
    assert on_kills == 0
    assert sorted(on["meta"]) == ["heavy_0", "heavy_1", "heavy_2"]
    waits = sorted(m["memsafe/admission_wait_s"] for m in on["meta"].values())
    assert waits[-1] > 1.0, waits  # someone waited for another step to finish
    assert all(m["memsafe/admission_source"] == "metadata" for m in on["meta"].values())
    assert any("waiting for" in w and "MB of 1,000 MB" in w for w in on["waits"]), on["waits"]
    assert on_peak < 1000
    print(
        f"admission off: {off_kills} OOM kill(s), failed {off['failed']}, cgroup peak "
        f"{off_peak:.0f} MB; on: 0 kills, waits {waits}, cgroup peak {on_peak:.0f} MB"
    )


# -- the ledger ---------------------------------------------------------------------------------


def _contender(path: str, barrier, granted, need_mb: float) -> None:
    ledger = AdmissionLedger(path, limits=_limits(1000))
    barrier.wait()
    fits, _state = ledger.try_reserve(need_mb, label=f"pid {os.getpid()}")
    granted.put(fits)
    time.sleep(0.5)  # hold it while the others decide


def test_check_and_reserve_is_atomic_across_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for trial in range(5):
        path = str(tmp_path / f"ledger-{trial}.json")
        barrier, granted = ctx.Barrier(8), ctx.Queue()
        procs = [
            ctx.Process(target=_contender, args=(path, barrier, granted, 300.0)) for _ in range(8)
        ]
        for p in procs:
            p.start()
        results = [granted.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(10)
        # 1000 MB above each process's RSS: the first three 300 MB reservations fit, the
        # fourth (100 MB left) does not, whatever the interleaving.
        assert sum(results) == 3, (trial, results)
        # All holders exited: their reservations are gone at the next read.
        assert AdmissionLedger(path, limits=_limits(1000)).reservations() == []


def _hold_then_wait(path: str, ready) -> None:
    AdmissionLedger(path, limits=_limits(1000)).try_reserve(700.0, label="victim")
    ready.set()
    time.sleep(60)


def test_a_sigkilled_holder_releases_its_reservation(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    path = str(tmp_path / "ledger.json")
    for _trial in range(8):
        ready = ctx.Event()
        victim = ctx.Process(target=_hold_then_wait, args=(path, ready))
        victim.start()
        assert ready.wait(30)
        ledger = AdmissionLedger(path, limits=_limits(1000), poll_interval_s=0.02)
        assert [e["pid"] for e in ledger.reservations()] == [victim.pid]
        # While it lives, 700 MB held leaves no room for 500 MB more (positive control).
        with pytest.raises(AdmissionTimeout, match="waiting for 500 MB: 1 step holds 700 MB"):
            ledger.reserve(500.0, timeout_s=0.1)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        granted = ledger.reserve(500.0, timeout_s=5)
        assert granted.reserved_mb == 500.0
        assert [e["pid"] for e in ledger.reservations()] == [os.getpid()]
        ledger.release()
        assert ledger.reservations() == []


def test_a_reused_pid_does_not_keep_a_reservation(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    # Our own pid with a start time that is not ours: a process that died and whose pid was
    # taken by another.
    path.write_text(json.dumps([{"pid": os.getpid(), "start": 1, "reserved_mb": 900}]))
    assert AdmissionLedger(str(path), limits=_limits(1000)).reservations() == []
    path.write_text("not json")
    assert AdmissionLedger(str(path), limits=_limits(1000)).reservations() == []


def test_the_default_ledger_is_one_file_per_memory_cgroup(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MEMSAFE_ADMISSION_LEDGER", raising=False)
    limits = detect_memory_limits()
    here = default_ledger_path(limits)
    assert here == default_ledger_path(detect_memory_limits())
    other = MemoryLimits(
        limit_bytes=limits.limit_bytes,
        source=limits.source,
        physical_bytes=limits.physical_bytes,
        cgroup_path=str(tmp_path),
    )
    assert default_ledger_path(other) != here
    monkeypatch.setenv("MEMSAFE_ADMISSION_LEDGER", str(tmp_path / "x.json"))
    assert default_ledger_path(limits) == str(tmp_path / "x.json")


def test_expected_increment_sources() -> None:
    assert expected_increment_mb(
        expected_peak_mb=600, history_increments_mb=[10], baseline_mb=150, limit_mb=4000
    ) == (450, "metadata")
    need, source = expected_increment_mb(
        expected_peak_mb=None,
        history_increments_mb=[100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 50],
        baseline_mb=150,
        limit_mb=4000,
    )
    assert source == "history"
    assert need == pytest.approx(900 * 1.2)
    assert expected_increment_mb(
        expected_peak_mb=None, history_increments_mb=[], baseline_mb=150, limit_mb=1000
    ) == (250, "default")
    assert default_reservation_mb(100_000) == 512


# -- in a Dagster step ------------------------------------------------------------------------


@dg.asset(metadata={"memsafe/expected_peak_mb": 1.0})
def light(context: dg.AssetExecutionContext, memory: MemoryMonitorResource) -> None:
    with memory.track(context), memory.track(context, record=False):
        pass  # nested: no second reservation


@dg.asset
def unannotated(context: dg.AssetExecutionContext, memory: MemoryMonitorResource) -> None:
    with memory.track(context):
        bytearray(8 * MiB)


def _meta(instance: dg.DagsterInstance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_steps_record_admission_and_their_increment(tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger.json")
    instance = dg.DagsterInstance.ephemeral()
    memory = MemoryMonitorResource(admission_ledger=ledger)
    assert dg.materialize(
        [light, unannotated], instance=instance, resources={"memory": memory}
    ).success
    meta = _meta(instance, "light")
    assert meta["memsafe/admission_source"] == "metadata"
    assert meta["memsafe/admission_reserved_mb"] == 0.0  # 1 MB peak is below the baseline
    assert meta["memsafe/admission_wait_s"] < 1
    assert 0 <= meta["memsafe/step_rss_mb"] < meta["memsafe/peak_rss_mb"]
    first = _meta(instance, "unannotated")
    assert first["memsafe/admission_source"] == "default"
    # The second run sizes the reservation from the first one's recorded increment.
    assert dg.materialize([unannotated], instance=instance, resources={"memory": memory}).success
    second = _meta(instance, "unannotated")
    assert second["memsafe/admission_source"] == "history"
    assert second["memsafe/admission_reserved_mb"] == pytest.approx(
        first["memsafe/step_rss_mb"] * 1.2, abs=0.2
    )
    assert AdmissionLedger(ledger).reservations() == []  # released after each step
    off = MemoryMonitorResource(admission=False, admission_ledger=ledger)
    assert dg.materialize([unannotated], instance=instance, resources={"memory": off}).success
    assert "memsafe/admission_wait_s" not in _meta(instance, "unannotated")
    assert "memsafe/step_rss_mb" in _meta(instance, "unannotated")


def _hold_big(path: str, ready) -> None:
    limits = detect_memory_limits()
    AdmissionLedger(path, limits=limits).try_reserve(limits.limit_bytes / MiB, label="hog")
    ready.set()
    time.sleep(60)


@dg.asset(metadata={"memsafe/expected_peak_mb": 4096.0})
def big(context: dg.AssetExecutionContext, memory: MemoryMonitorResource) -> None:
    with memory.track(context):
        pass


def test_a_step_that_never_fits_fails_with_a_memsafe_failure(tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger.json")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    hog = ctx.Process(target=_hold_big, args=(ledger, ready))
    hog.start()
    try:
        assert ready.wait(30)
        memory = MemoryMonitorResource(admission_ledger=ledger, admission_timeout_s=0.5)
        result = dg.materialize([big], resources={"memory": memory}, raise_on_error=False)
        assert not result.success
        failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
        assert failure.description.startswith("memsafe: admission timed out for asset big")
        assert "1 step holds" in failure.description
    finally:
        os.kill(hog.pid, signal.SIGKILL)
        hog.join(10)
    # Once the hog is gone the same step is admitted at once (positive control).
    assert dg.materialize([big], resources={"memory": memory}).success
