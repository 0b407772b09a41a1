"""The command line as a new user meets it: one flag scheme for sizes, `status` as a probe,
`monitor` judging the container (not itself) and piping into `head`, `recover` on a file.

Every test here failed on the previous code (tracebacks, exit 0 at EMERGENCY, "clean" for a
file, the monitor's own RSS as the figure).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BIN

from memsafe_dagster.memory.cgroup_cap import run_capped

MEMSAFE = str(BIN / "memsafe")


def memsafe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MEMSAFE, *args], capture_output=True, text=True, env=dict(os.environ), timeout=120
    )


# -- one scheme for sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "process_mb"),
    [
        (["--max-memory", "512"], 512.0),  # a bare number is MB
        (["--max-memory", "512MB"], 512.0),
        (["--max-memory", "1g"], 1024.0),
        (["--max-memory", "1.5GiB"], 1536.0),
        (["--max-process-mb", "256"], 256.0),  # the old spelling still works
    ],
)
def test_size_flags_take_mb_or_a_unit(args: list[str], process_mb: float) -> None:
    out = memsafe("status", "--json", *args)
    assert out.returncode in (0, 3, 4), out.stderr
    assert json.loads(out.stdout)["budgets"]["max_process_memory_mb"] == process_mb


def test_the_same_size_flags_for_status_monitor_and_merge() -> None:
    for command in ("status", "monitor", "merge"):
        text = memsafe(command, "--help").stdout
        for flag in ("--max-memory SIZE", "--max-pyarrow SIZE", "--min-available SIZE"):
            assert flag in text, (command, flag)
        assert "--max-process-mb" not in text  # aliases stay unlisted
    assert "--limit SIZE" in memsafe("run", "--help").stdout


def test_a_bad_size_names_the_flag_and_the_format() -> None:
    out = memsafe("status", "--max-memory", "lots")
    assert out.returncode == 2
    assert "--max-memory" in out.stderr and "512MB" in out.stderr


def test_merge_reads_a_bare_number_as_mb(tmp_path: Path) -> None:
    source = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": pa.array(range(100), pa.int64())}), source)
    out = memsafe("merge", str(source), str(tmp_path / "t"), "--key", "id", "--max-memory", "512")
    assert out.returncode == 0, out.stderr  # 512 bytes would be refused as too small
    assert "100 inserted" in out.stdout


# -- status is a probe ------------------------------------------------------------------------


def test_status_exits_non_zero_at_emergency() -> None:
    calm = memsafe("status")
    assert calm.returncode == 0, calm.stderr
    for args in (["--max-memory", "1"], ["--json", "--max-memory", "1"]):
        out = memsafe("status", *args)
        assert out.returncode == 4, (args, out.stdout, out.stderr)
    assert json.loads(out.stdout)["pressure"] == "emergency"
    assert (
        "exit status: 0 NORMAL or WARNING, 3 CRITICAL, 4 EMERGENCY"
        in memsafe("status", "--help").stdout
    )


# -- the monitor ------------------------------------------------------------------------------


def test_monitor_piped_into_head_stops_quietly() -> None:
    proc = subprocess.run(
        ["bash", "-c", f"{MEMSAFE} monitor --interval 0.02 --count 200 | head -1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert len(proc.stdout.splitlines()) == 1 and "Pressure:" in proc.stdout
    assert proc.stderr == "", proc.stderr  # no BrokenPipeError traceback
    status = subprocess.run(
        [
            "bash",
            "-c",
            f"{MEMSAFE} monitor --interval 0.02 --count 200 | head -1 >/dev/null;"
            " echo ${PIPESTATUS[0]}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.stdout.strip() == "141"  # 128 + SIGPIPE, as a shell reports it


HOLDER = textwrap.dedent(
    """
    import subprocess, sys, time
    hog = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]);"
         " print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert hog.stdout.readline().strip() == "held"
    out = subprocess.run([sys.argv[1], "monitor", "--count", "1"], capture_output=True, text=True)
    hog.kill()
    print(out.stdout, end="")
    print(out.stderr, end="", file=sys.stderr)
    """
)


@pytest.mark.usefixtures("cgroup_caps")
def test_monitor_reports_the_containers_working_set_not_its_own_rss() -> None:
    """A sibling holding 200 MB in the same (real, capped) cgroup shows in the figure."""
    run = run_capped([sys.executable, "-c", HOLDER, MEMSAFE], "600m", timeout_s=60)
    assert run.returncode == 0, run.stderr
    line = run.stdout.strip()
    assert "Working set: " in line and "of 600.0MB" in line, line
    used_mb = float(line.split("Working set: ")[1].split("MB")[0])
    assert used_mb > 200, line  # the hog's 200 MB plus both interpreters


# -- recover ----------------------------------------------------------------------------------


def test_recover_on_a_file_says_it_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": [1]}), path)
    out = memsafe("recover", str(path))
    assert out.returncode == 2
    assert "is a file" in out.stderr and "clean" not in out.stdout
