"""run_measured / run_capped report the child's own peak, and caps are real."""

import sys

import pytest

from memsafe_dagster.memory.cgroup_cap import run_capped, run_measured

MiB = 1024 * 1024
ALLOCATE_100MB = "x = b'1' * (100 * 1024 * 1024); import time; time.sleep(0.05)"


def test_peak_is_the_childs_own_not_the_parents() -> None:
    parent_ballast = b"p" * (400 * MiB)  # a fork would carry this into ru_maxrss
    result = run_measured([sys.executable, "-c", ALLOCATE_100MB])
    assert result.returncode == 0
    assert 100 * MiB < result.peak_rss_bytes < 200 * MiB
    del parent_ballast


def test_peak_covers_grandchildren() -> None:
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {ALLOCATE_100MB!r}])"
    result = run_measured([sys.executable, "-c", code])
    assert result.peak_rss_bytes > 100 * MiB


def test_timeout_kills_and_reports() -> None:
    result = run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5)
    assert result.timed_out and result.returncode == -9 and result.wall_s < 10


@pytest.mark.usefixtures("cgroup_caps")
def test_cap_kills_what_does_not_fit_and_spares_what_does() -> None:
    over = run_capped([sys.executable, "-c", "x = b'1' * (300 * 1024 * 1024)"], "150m")
    assert over.oom_killed and over.returncode == -9
    fits = run_capped([sys.executable, "-c", ALLOCATE_100MB], "300m")
    assert fits.returncode == 0 and not fits.oom_killed
    assert fits.cgroup_peak_bytes is not None and fits.cgroup_peak_bytes <= 300 * MiB
