"""The streaming graph through `dagster asset materialize`: every step in its own process, the
same metadata read back from the instance, and no warning raised from memsafe_dagster."""

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster_helpers import events_of_type
from test_io_manager import assert_graph_metadata

import memsafe_dagster

REPO = Path(__file__).resolve().parent.parent
DAGSTER = Path(sys.executable).parent / "dagster"


def our_modules() -> list[str]:
    names = ["memsafe_dagster"]
    for info in pkgutil.walk_packages(memsafe_dagster.__path__, prefix="memsafe_dagster."):
        names.append(info.name)
    return names


@pytest.mark.slow
def test_cli_materializes_the_graph_one_process_per_step(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # Any warning raised from one of our modules (a deprecated or beta Dagster API called by
    # us is attributed to us) becomes an error and fails its step; the rest are shown.
    warnings = ["default"] + [f"error::Warning:{name}" for name in our_modules()]
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PYTHONWARNINGS": ",".join(warnings),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.pop("MEMSAFE_MEMORY_LIMIT", None)
    env.pop("CONTAINER_MEMORY_LIMIT", None)
    proc = subprocess.run(
        [
            str(DAGSTER),
            "asset",
            "materialize",
            "-f",
            str(REPO / "tests" / "dagster_defs_streaming.py"),
            "--select",
            "*",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]

    with dg.DagsterInstance.from_config(str(home)) as instance:
        [run] = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        storage = Path(instance.storage_directory())
        assert storage.is_relative_to(home)
        assert_graph_metadata(instance, storage)

        starts = events_of_type(instance, run.run_id, dg.DagsterEventType.STEP_START)
        assert sorted(e.step_key for e in starts) == sorted(
            ["raw_events", "positive_events", "large_amounts", "amount_summary"]
        )
        pids = {e.pid for e in starts}
        assert len(pids) == 4, f"steps shared processes: {pids}"
        [run_start] = events_of_type(instance, run.run_id, dg.DagsterEventType.RUN_START)
        assert run_start.pid not in pids

        compute_logs = [p.read_text(errors="replace") for p in home.rglob("*.err")]
    for text in [output, *compute_logs]:
        ours = [
            line
            for line in text.splitlines()
            if "memsafe_dagster" in line and "Warning" in line and "site-packages" not in line
        ]
        assert not ours, "\n".join(ours)
