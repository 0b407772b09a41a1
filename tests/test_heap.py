"""memory.process.bound_heap: freed multi-MB buffers go back to the kernel (RSS drops), where
glibc's own dynamic mmap threshold keeps them resident inside its heap."""

import subprocess
import sys

import pytest

from memsafe_dagster.memory.process import bound_heap

SCRIPT = """
import sys
from memsafe_dagster.memory.process import bound_heap, current_rss_bytes
if sys.argv[1] == "bound":
    assert bound_heap()
big = bytearray(16 << 20)
del big  # glibc raises its mmap threshold past 16 MiB here
blocks = [bytearray(4 << 20) for _ in range(50)]  # 200 MiB, now from the heap
pin = bytearray(200_000)  # a heap block above them: the heap's top cannot shrink
before = current_rss_bytes()
del blocks
print((before - current_rss_bytes()) >> 20)
"""


def _released_mb(mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


@pytest.mark.skipif(not bound_heap(), reason="not glibc: malloc is left as it is")
def test_freed_buffers_leave_rss_once_the_heap_is_bound() -> None:
    assert _released_mb("bound") >= 150  # the 200 MiB of blocks left RSS
    assert _released_mb("plain") < 50  # control: glibc's default keeps them resident
