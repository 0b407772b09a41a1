"""Adaptive chunk sizing driven by a scripted pressure source."""

import pytest
from stream_helpers import CRITICAL, EMERGENCY, NORMAL, WARNING, ScriptedMonitor, ids_of, table

import memsafe_dagster.datasets.adaptive as adaptive_module
from memsafe_dagster.datasets import AdaptiveChunkSizer, ChunkStream, process_in_chunks
from memsafe_dagster.memory import MemoryPressureError, PeakWindow


@pytest.fixture
def collections(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = adaptive_module.gc.collect

    def counting_collect(*args: int) -> int:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(adaptive_module.gc, "collect", counting_collect)
    return calls


def stream_of(rows: int, monitor: ScriptedMonitor, chunk: int = 10_000, **kw: object):
    return process_in_chunks(table(rows), chunk, memory_monitor=monitor, check_interval_s=0, **kw)


def test_warning_shrinks_x08_critical_x05_and_normal_grows_back(collections: list[int]) -> None:
    monitor = ScriptedMonitor([NORMAL, WARNING, CRITICAL] + [NORMAL] * 50)
    stream = stream_of(200_000, monitor)
    chunks = list(stream)
    sizes = stream.stats.sizes
    assert sizes[:3] == [10_000, 8_000, 4_000]
    # three calm checks, then x1.25 (+1) per three calm checks, capped at the request
    assert sizes[3:9] == [4_000, 4_000, 5_001, 5_001, 5_001, 6_252]
    assert max(sizes) == 10_000 and sizes[-1] == 10_000
    assert all(c.num_rows <= s for c, s in zip(chunks, sizes, strict=True))
    assert ids_of(chunks) == list(range(200_000))
    assert stream.stats.resizes >= 5
    assert stream.stats.max_pressure is CRITICAL
    assert len(collections) == 1  # CRITICAL collects
    assert stream.stats.peak_rss_mb > 0


def test_emergency_raises_with_status_after_one_collection(collections: list[int]) -> None:
    monitor = ScriptedMonitor([NORMAL, NORMAL, EMERGENCY, EMERGENCY])
    stream = stream_of(100_000, monitor)
    assert next(stream).num_rows == 10_000
    assert next(stream).num_rows == 10_000
    with pytest.raises(MemoryPressureError) as info:
        next(stream)
    err = info.value
    assert isinstance(err, MemoryError)
    assert err.level is EMERGENCY
    assert "process_rss_mb" in err.status and "limit_mb" in err.status
    assert "chunk 3" in str(err) and "20,000 rows done" in str(err)
    assert len(collections) == 1
    assert monitor.checks == 4  # the EMERGENCY was rechecked once
    assert stream.stats.max_pressure is EMERGENCY
    assert list(stream) == []  # the stream is closed


def test_emergency_relieved_by_collection_acts_as_critical(collections: list[int]) -> None:
    monitor = ScriptedMonitor([EMERGENCY, NORMAL] + [NORMAL] * 20)
    stream = stream_of(30_000, monitor)
    assert next(stream).num_rows == 5_000
    assert len(collections) == 1  # the collection before the recheck counts for CRITICAL


def test_not_adaptive_keeps_size_but_still_stops_at_emergency() -> None:
    monitor = ScriptedMonitor([WARNING, CRITICAL, WARNING, EMERGENCY])
    stream = stream_of(100_000, monitor, adaptive=False)
    sizes = [next(stream).num_rows for _ in range(3)]
    assert sizes == [10_000, 10_000, 10_000]
    with pytest.raises(MemoryPressureError):
        next(stream)


def test_a_callers_resize_becomes_the_new_request() -> None:
    monitor = ScriptedMonitor([NORMAL])
    stream = stream_of(60_000, monitor)
    assert next(stream).num_rows == 10_000
    stream.chunk_size_rows = 2_000
    rest = [c.num_rows for c in stream]
    assert set(rest) == {2_000}  # calm checks do not grow it back to 10,000
    assert len(rest) == 25


def test_chunks_never_shrink_below_min_rows(collections: list[int]) -> None:
    monitor = ScriptedMonitor([CRITICAL])
    stream = stream_of(50_000, monitor)
    rows = [c.num_rows for c in stream]
    assert sum(rows) == 50_000
    assert len(collections) == 1  # sustained CRITICAL collects at most once a second
    assert min(stream.stats.sizes) == 1_000
    assert stream.stats.sizes[:5] == [5_000, 2_500, 1_250, 1_000, 1_000]


def test_checks_are_throttled_only_while_calm() -> None:
    monitor = ScriptedMonitor([WARNING, WARNING, NORMAL])
    stream = process_in_chunks(table(100_000), 10_000, memory_monitor=monitor, check_interval_s=60)
    list(stream)
    # WARNING and WARNING again are each followed by a check; after NORMAL it waits 60 s.
    assert monitor.checks == 3
    assert stream.stats.chunks > 10


def test_sizer_as_a_plain_hook() -> None:
    monitor = ScriptedMonitor([WARNING, WARNING, NORMAL])
    stream = ChunkStream.from_batches(table(1_000), chunk_size_rows=100)
    sizer = AdaptiveChunkSizer(monitor, 100, min_rows=10)
    stream.add_hooks(before_chunk=sizer)
    sizes = [c.num_rows for c in stream][:3]
    assert sizes == [80, 64, 64]
    assert sizer.checks >= 3


def test_negative_check_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="min_check_interval_s"):
        AdaptiveChunkSizer(ScriptedMonitor([NORMAL]), 10, min_check_interval_s=-1)


def test_stream_peaks_are_a_window_opened_on_attach_and_closed_with_the_stream() -> None:
    monitor = ScriptedMonitor([NORMAL])
    stream = stream_of(30_000, monitor)
    window = stream.stats.window
    assert isinstance(window, PeakWindow) and window.monitor is monitor and not window.closed
    list(stream)
    assert window.closed and window.samples == monitor.checks
    assert stream.stats.peak_rss_mb == window.peak_rss_mb > 0
    assert stream.stats.peak_pyarrow_mb == window.peak_pyarrow_mb
    doc = stream.stats.to_dict()
    assert doc["peak_rss_mb"] == window.peak_rss_mb and "window" not in doc


def test_a_stream_attached_twice_keeps_its_first_window() -> None:
    monitor = ScriptedMonitor([NORMAL])
    stream = stream_of(30_000, monitor)
    first = stream.stats.window
    again = process_in_chunks(stream, 10_000, memory_monitor=monitor, check_interval_s=0)
    assert again is stream and stream.stats.window is first
    list(stream)
    assert first.closed
