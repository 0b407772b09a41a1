"""MemorySampler: one thread per monitor however many ask, at the fastest interval asked for,
feeding every open window; it stops with the last request."""

import threading
import time

import pytest
from memory_helpers import fixed_limits

from memsafe_dagster.datasets.merge.guard import MergeGuard
from memsafe_dagster.memory import MemoryMonitor, PeakWindow
from memsafe_dagster.memory.sampler import THREAD_NAME


def monitor() -> MemoryMonitor:
    return MemoryMonitor(min_system_available_mb=0, limits=fixed_limits())


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def wait_for_samples(m: MemoryMonitor, count: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    target = m.sampler.samples + count
    while m.sampler.samples < target:
        assert time.monotonic() < deadline, "the sampler did not sample"
        time.sleep(0.005)


def test_several_users_share_one_thread() -> None:
    m = monitor()
    before = len(sampler_threads())
    guard = MergeGuard(m, workers=2, chunk_rows=1_000)
    with m.sampling(0.05), m.sampler.request(0.1), guard:
        m.start_sampling(0.2)
        assert m.sampler.users == 4
        assert len(sampler_threads()) == before + 1
        assert not [t for t in threading.enumerate() if t.name.startswith("memsafe-merge")]
        m.stop_sampling()
    assert len(sampler_threads()) == before
    assert m.sampler.users == 0 and not m.sampler.running


def test_each_monitor_has_its_own_thread() -> None:
    first, second = monitor(), monitor()
    before = len(sampler_threads())
    with first.sampling(0.05), second.sampling(0.05):
        assert len(sampler_threads()) == before + 2
    assert len(sampler_threads()) == before


def test_the_thread_lives_while_any_request_is_held() -> None:
    m = monitor()
    one = m.sampler.request(0.05)
    two = m.sampler.request(0.05)
    one.release()
    one.release()  # releasing twice does not drop someone else's claim
    assert m.sampler.running and m.sampler.users == 1
    two.release()
    assert not m.sampler.running
    with m.sampler.request(0.05):  # and it starts again
        assert m.sampler.running
    assert m._sampler is None


def test_start_sampling_stands_until_stop_sampling() -> None:
    m = monitor()
    m.start_sampling(0.05)
    m.start_sampling(0.01)  # already asked for: no second claim
    with m.sampling(0.05):
        pass
    assert m.sampler.running and m.sampler.users == 1
    m.stop_sampling()
    assert not m.sampler.running


def test_the_fastest_request_sets_the_interval_at_once_and_slower_ones_resume() -> None:
    m = monitor()
    slow = m.sampler.request(1.0)
    wait_for_samples(m, 1)  # the thread now waits out its one-second period
    assert m.sampler.interval_s == 1.0
    fast = m.sampler.request(0.01)
    assert m.sampler.interval_s == 0.01
    started = m.sampler.samples
    time.sleep(0.3)
    assert m.sampler.samples - started >= 5, "the faster request did not take effect"
    fast.release()
    assert m.sampler.interval_s == 1.0
    time.sleep(0.05)
    calm = m.sampler.samples
    time.sleep(0.3)
    assert m.sampler.samples - calm <= 1, "the sampler kept the released fast interval"
    slow.release()
    assert m.sampler.interval_s is None


def test_one_thread_feeds_every_open_window() -> None:
    m = monitor()
    outer = PeakWindow(m)
    with m.sampling(0.01):
        wait_for_samples(m, 3)
        with PeakWindow(m) as inner:
            wait_for_samples(m, 3)
        wait_for_samples(m, 2)
    outer.close()
    assert inner.samples >= 3
    assert outer.samples >= inner.samples + 5
    assert m.window.samples >= outer.samples


def test_cpu_seconds_accumulate_over_restarts() -> None:
    m = monitor()
    with m.sampling(0.01):
        wait_for_samples(m, 5)
    first = m.sampler.cpu_seconds
    with m.sampling(0.01):
        wait_for_samples(m, 5)
    assert 0 < first < m.sampler.cpu_seconds < 0.5
    assert m.sampler.samples >= 10


@pytest.mark.parametrize("interval", [0, -1, True, "0.1"])
def test_a_bad_interval_is_refused(interval: object) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        monitor().sampler.request(interval)  # type: ignore[arg-type]
