"""docs/memory-constrained-environments.md: its examples are the seed's with only imports
changed, and the memory-monitoring examples run (the streaming and merge ones run in
test_seed_streaming_examples.py and test_merge_seed_example.py, from the same file)."""

import difflib
import os
import subprocess
import sys

import pytest
from doc_examples import DOC, SEED, blocks, example

# The only non-import changes DESIGN.md allows, each marked in the doc: lines added carry a
# marker; lines removed are exactly the seed's write_parquet calls and the select that drops
# the column its next stage needs.
ALLOWED_MARKERS = ("# writer", '# stage 3 needs "category"')
REPLACED_SEED_LINES = {
    "processed_chunk.write_parquet(",
    "output_path,",
    "compression='snappy'",
    "compression='snappy',",
    "write_append=True",
    ")",
    'return data.select(["id", "value", "processed_date"])',
}


def is_import(line: str) -> bool:
    return line.strip().startswith(("from ", "import "))


def test_examples_differ_from_the_seed_only_where_allowed() -> None:
    ours = [b for b in blocks(DOC) if b.language == "python"]
    seed = [b for b in blocks(SEED) if b.language == "python"]
    assert [b.heading for b in ours] == [b.heading for b in seed]
    for mine, theirs in zip(ours, seed, strict=True):
        changed = [
            line
            for line in difflib.ndiff(theirs.code.splitlines(), mine.code.splitlines())
            if line[:2] in ("- ", "+ ")
        ]
        for line in changed:
            text = line[2:]
            allowed = (
                is_import(text)
                or not text.strip()
                or (line.startswith("+ ") and any(m in text for m in ALLOWED_MARKERS))
                or (line.startswith("- ") and text.strip() in REPLACED_SEED_LINES)
            )
            assert allowed, f"{mine.heading}: non-import change {line!r}"


def test_no_example_mentions_the_seed_library() -> None:
    assert "fsspeckit" not in DOC.read_text(encoding="utf-8")


def run_example(code: str, env: dict[str, str] | None = None) -> str:
    """Run an example in a fresh interpreter, as a user pasting it would."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


SIMPLE = example("Simple Memory Monitoring")


def test_simple_memory_monitoring() -> None:
    out = run_example(SIMPLE).splitlines()
    assert out[0].startswith("PyArrow: ") and out[0].endswith("MB")
    assert out[1].startswith("Process: ") and float(out[1].split()[1].rstrip("MB")) > 10
    assert out[2].startswith("System: ") and float(out[2].split()[1].rstrip("MB")) > 0


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        ("2g", "819MB PyArrow, 1228MB process, 409MB system reserve"),
        ("1024m", "409MB PyArrow, 614MB process, 204MB system reserve"),
    ],
)  # fmt: skip
def test_container_environment_example(limit: str, expected: str) -> None:
    code = SIMPLE + example("Container Environment Example")
    out = run_example(code, env={"CONTAINER_MEMORY_LIMIT": limit})
    assert out.splitlines()[-1] == f"Container memory configuration: {expected}"


def test_container_environment_example_without_a_limit_uses_physical_memory() -> None:
    out = run_example(SIMPLE + example("Container Environment Example"))
    assert out.splitlines()[-1].startswith("Container memory configuration: ")


def test_development_environment_example() -> None:
    code = (
        SIMPLE
        + example("Development Environment Example")
        + (
            "\nprint(dev_monitor.max_pyarrow_mb, dev_monitor.max_process_memory_mb,"
            " dev_monitor.min_system_available_mb)\n"
        )
    )
    tiers = {"256 512 128", "512 1024 256", "1024 2048 512"}
    assert run_example(code).splitlines()[-1] in tiers


def test_monitoring_dashboard_prints_one_line_per_tick() -> None:
    namespace: dict = {}
    exec(SIMPLE.replace("print(", "(lambda *a: None)("), namespace)  # its imports
    exec(
        "from memsafe_dagster.memory import MemoryPressureLevel\n"
        + example("Memory Monitoring Dashboard"),
        namespace,
    )
    loop = namespace["monitoring_thread"]
    assert callable(loop)

    class Stop(BaseException):
        pass

    ticks = []

    def sleep(_seconds: float) -> None:
        ticks.append(_seconds)
        raise Stop

    lines: list[str] = []
    namespace["time"] = type("T", (), {"sleep": staticmethod(sleep)})
    namespace["print"] = lines.append
    with pytest.raises(Stop):
        loop()
    assert ticks == [60]
    assert lines[0].startswith("✅ [") and lines[0].endswith("Pressure: NORMAL")
    assert "PyArrow: " in lines[0] and "Process: " in lines[0] and "System: " in lines[0]


def test_troubleshooting_examples() -> None:
    code = SIMPLE + example("Memory limit exceeded") + example("Slow performance with monitoring")
    out = run_example(code).splitlines()
    assert out[3].startswith("pressure=") and "limit=" in out[3]
    assert out[4] in {f"Current pressure: {lvl}" for lvl in ("normal", "warning", "critical")}
    assert out[5] == "psutil available: True"


# The doc says which examples need something of the user's; every other one runs as pasted.
NEEDS_USER_INPUT = ("Processing Large Datasets", "Dynamic Chunk Size Adjustment", "Pipeline")


@pytest.mark.parametrize(
    "heading",
    [
        b.heading
        for b in blocks(DOC)
        if b.language == "python" and not any(n in b.heading for n in NEEDS_USER_INPUT)
    ],
)
def test_examples_run_as_pasted(heading: str, tmp_path) -> None:
    """Pasted alone into a fresh interpreter, in an empty directory, with no glue."""
    code = next(b.code for b in blocks(DOC) if b.heading == heading and b.language == "python")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
