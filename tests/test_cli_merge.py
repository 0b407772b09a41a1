"""``memsafe merge`` (with its progress bar on a terminal) and ``memsafe recover``."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from merge_helpers import child_env, merge_argv, read_dataset, snapshot, write_files

MEMSAFE = [sys.executable, "-m", "memsafe_dagster.cli"]


def _data(tmp_path: Path) -> tuple[Path, Path]:
    ids = np.arange(20_000, dtype=np.int64)
    target = tmp_path / "target"
    write_files(
        target,
        [
            pa.table({"id": ids[:10_000], "g": ids[:10_000] % 3, "v": pa.array(["t"] * 10_000)}),
            pa.table({"id": ids[10_000:], "g": ids[10_000:] % 3, "v": pa.array(["t"] * 10_000)}),
        ],
    )
    src = np.arange(15_000, 25_000, dtype=np.int64)
    source = tmp_path / "source"
    write_files(source, [pa.table({"id": src, "g": src % 3, "v": pa.array(["s"] * 10_000)})])
    return source, target


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MEMSAFE, *args],
        capture_output=True,
        text=True,
        env={**child_env(), **(env or {})},
        timeout=120,
    )


def test_merge_prints_the_result_as_json(tmp_path: Path) -> None:
    source, target = _data(tmp_path)
    proc = _run("merge", str(source), str(target), "--key", "id", "--max-memory", "512MB", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["strategy"] == "upsert" and doc["updated"] == 5_000 and doc["inserted"] == 5_000
    assert doc["target_count_after"] == 25_000 == read_dataset(target).num_rows
    assert "merge:" not in proc.stderr, "no progress bar without a terminal"


def test_merge_summary_with_a_composite_key_and_strategy(tmp_path: Path) -> None:
    source, target = _data(tmp_path)
    proc = _run(
        "merge",
        str(source),
        f"file://{target}",
        "--key",
        "id",
        "--key",
        "g",
        "--strategy",
        "delete",
    )
    assert proc.returncode == 0, proc.stderr
    assert "5,000 deleted" in proc.stdout and "20,000 -> 15,000 rows" in proc.stdout
    assert "peak RSS" in proc.stdout
    assert read_dataset(target).num_rows == 15_000


def test_merge_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    source, target = _data(tmp_path)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [*MEMSAFE, "merge", str(source), str(target), "--key", "id", "--chunk-rows", "1000"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=child_env(),
    )
    os.close(terminal)
    output = b""
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:
            break
        if not data:
            break
        output += data
    proc.wait(timeout=120)
    os.close(controller)
    text = output.decode("utf-8", "replace")
    assert proc.returncode == 0, text
    assert "merge:" in text and "row" in text and "100%" in text, text
    assert "5,000 inserted" in text


def test_merge_errors_are_one_line_and_change_nothing(tmp_path: Path) -> None:
    source, target = _data(tmp_path)
    before = snapshot(target)
    proc = _run("merge", str(source), str(target), "--key", "nope")
    assert proc.returncode == 2
    assert "memsafe merge: error:" in proc.stderr and "'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(target) == before


def _write(path: Path, table: pa.Table) -> Path:
    write_files(path, [table])
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("target is a file", "is a file; a merge target is a dataset directory"),
        ("source does not exist", "source '{tmp}/nowhere' does not exist"),
        ("source is not Parquet", "source file '{tmp}/bad/notes.parquet' is not a readable"),
        ("duplicate keys", "pass --on-duplicate-keys first|last"),
        ("source lacks a column", "source lacks column(s) ['v']"),
        ("empty full_merge", "pass --allow-empty-source if that is intended"),
    ],
)
def test_merge_errors_speak_the_commands_language(tmp_path: Path, case: str, expected: str) -> None:
    source, target = _data(tmp_path)
    ids = pa.array([1, 2, 2], pa.int64())
    argv = {
        "target is a file": [str(source), str(sorted(target.glob("*.parquet"))[0])],
        "source does not exist": [str(tmp_path / "nowhere"), str(target)],
        "source is not Parquet": [str(tmp_path / "bad"), str(target)],
        "duplicate keys": [
            str(_write(tmp_path / "dup", pa.table({"id": ids, "g": ids, "v": ["a", "b", "c"]}))),
            str(target),
        ],
        "source lacks a column": [
            str(_write(tmp_path / "part", pa.table({"id": ids[:1], "g": ids[:1]}))),
            str(target),
        ],
        "empty full_merge": [
            str(_write(tmp_path / "empty", pa.table({"id": ids, "g": ids, "v": ["a"] * 3})[:0])),
            str(target),
            "--strategy",
            "full_merge",
        ],
    }[case]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "notes.parquet").write_text("not parquet")
    before = snapshot(target)
    proc = _run("merge", *argv, "--key", "id")
    assert proc.returncode == 2, proc.stderr
    assert expected.format(tmp=tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(target) == before


def test_merge_memory_advice_names_the_commands_options(tmp_path: Path) -> None:
    """A budget below what the interpreter already uses: EMERGENCY, advice in flags."""
    source, target = _data(tmp_path)
    before = snapshot(target)
    proc = _run("merge", str(source), str(target), "--key", "id", "--max-memory", "1MB")
    assert proc.returncode == 1, proc.stderr
    assert "memory pressure EMERGENCY" in proc.stderr
    assert "raise --max-memory" in proc.stderr and "memory budget" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(target) == before


def test_merge_memory_advice_under_a_small_limit_suggests_a_budget_that_fits(
    tmp_path: Path,
) -> None:
    """The default budget (60 % of a small limit) sits near the interpreter's own baseline:
    the advice says so and names a budget, instead of "lower --chunk-rows"."""
    source, target = _data(tmp_path)
    before = snapshot(target)
    proc = _run(
        "merge", str(source), str(target), "--key", "id", env={"MEMSAFE_MEMORY_LIMIT": "100MB"}
    )
    assert proc.returncode == 1, proc.stderr
    assert "memory pressure EMERGENCY" in proc.stderr
    assert "--chunk-rows" not in proc.stderr, proc.stderr
    fits = re.search(r"raise --max-memory \(about (\d+) MB would fit\)", proc.stderr)
    assert fits and int(fits.group(1)) > 60, proc.stderr
    assert "--max-memory defaults to 60 % of the 100 MB limit" in proc.stderr
    assert snapshot(target) == before


def test_merge_fills_missing_columns_with_nulls_when_asked(tmp_path: Path) -> None:
    _, target = _data(tmp_path)
    part = _write(tmp_path / "part", pa.table({"id": pa.array([5, 99_999]), "g": [0, 0]}))
    proc = _run("merge", str(part), str(target), "--key", "id", "--missing-columns", "null")
    assert proc.returncode == 0, proc.stderr
    by_id = {r["id"]: r["v"] for r in read_dataset(target).to_pylist()}
    assert by_id[5] is None and by_id[99_999] is None and by_id[6] == "t"


def test_recover_of_a_path_that_does_not_exist_fails(tmp_path: Path) -> None:
    proc = _run("recover", str(tmp_path / "typo"))
    assert proc.returncode == 2
    assert f"{tmp_path / 'typo'} does not exist" in proc.stderr
    assert not (tmp_path / "typo").exists()


def test_merge_on_a_locked_target_exits_3(tmp_path: Path) -> None:
    source, target = _data(tmp_path)
    (target / "_memsafe").mkdir()
    (target / "_memsafe" / "lock").write_text(
        json.dumps({"token": "t", "pid": 1, "host": "another-host", "acquired_at": 0})
    )
    proc = _run("merge", str(source), str(target), "--key", "id", "--lock-timeout", "0.2")
    assert proc.returncode == 3
    assert "locked by another writer" in proc.stderr
    proc = _run("recover", str(target), "--break-lock", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["lock_broken"] is True


@pytest.mark.slow
def test_recover_rolls_a_crashed_merge_forward(tmp_path: Path) -> None:
    source, target = _data(tmp_path)
    crashed = subprocess.run(
        merge_argv(source, target, "id", merge_min_system_available_mb=0),
        env=child_env(MEMSAFE_CRASH_AT="commit-moved-one"),
        capture_output=True,
        timeout=120,
    )
    assert crashed.returncode == -signal.SIGKILL
    proc = _run("recover", str(target))
    assert proc.returncode == 0, proc.stderr
    assert "rolled forward commit" in proc.stdout
    out = read_dataset(target)
    assert out.num_rows == 25_000
    assert len(set(out.column("id").to_pylist())) == 25_000
    proc = _run("recover", str(target))
    assert proc.returncode == 0 and "clean, nothing to recover" in proc.stdout
