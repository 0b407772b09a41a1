"""The README's examples run as written (in a scratch directory: they use relative paths)."""

import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_dagster_example_materializes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(python_examples()[0], namespace)
    defs: dg.Definitions = namespace["defs"]
    instance = dg.DagsterInstance.ephemeral()
    for day in ("2026-01-01", "2026-01-02"):
        result = dg.materialize(
            [namespace[n] for n in ("orders_raw", "orders_clean", "warehouse_orders")],
            resources=defs.resources,
            partition_key=day,
            instance=instance,
        )
        assert result.success
    target = ds.dataset("lake/warehouse/orders", format="parquet").to_table()
    # amount > 0 keeps ids 5001..99999; the second day updates every one of them.
    assert target.num_rows == 94_999
    assert set(target.column("day").to_pylist()) == {"2026-01-02"}
    event = instance.get_latest_materialization_event(dg.AssetKey("warehouse_orders"))
    meta = event.asset_materialization.metadata
    assert meta["memsafe/updated"].value == 94_999 and meta["memsafe/inserted"].value == 0
    assert meta["dagster/row_count"].value == 94_999
    assert meta["memsafe/peak_rss_mb"].value > 0


def test_the_core_example_prints_what_it_says_every_time(tmp_path: Path) -> None:
    # A fresh interpreter, as a user runs it: its 384 MB budget is for that process alone.
    # Run twice in one directory: the second run finds the first's dataset and must print the
    # same (appending the three rows again made id 1..3 occur twice).
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", python_examples()[2]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("1 1 1 ")
        assert lines[1:] == ["4"]
    ids = ds.dataset(str(tmp_path / "lake/customers")).to_table()["id"].to_pylist()
    assert sorted(ids) == [1, 2, 3, 4]


def test_the_inbox_example_runs_alone_and_merges_a_dropped_file_once(tmp_path: Path) -> None:
    """Pasted alone into a fresh interpreter, its Definitions load (sensors, schedule)."""
    check = (
        python_examples()[1] + "\ndg.Definitions.validate_loadable(defs)\n"
        "print(sorted(s.name for s in defs.sensors), [s.name for s in defs.schedules])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        "['customers_inbox', 'memsafe_failure_sensor'] ['warehouse_returns_job_schedule']"
    )


def test_the_inbox_example_merges_a_dropped_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(python_examples()[1], namespace)
    defs = namespace["defs"]
    customers, sensor = namespace["warehouse_customers"], namespace["customers_inbox"]
    inbox = tmp_path / "lake/inbox/customers"
    inbox.mkdir(parents=True)
    export = pa.table({"customer_id": [1, 2, 2], "name": ["ann", "bob", "bobby"]})
    pq.write_table(export, inbox / "export-1.parquet")
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(instance=instance, definitions=defs) as context,
    ):
        [request] = sensor.evaluate_tick(context).run_requests
        result = dg.materialize(
            [customers],
            resources=defs.resources,
            instance=instance,
            run_config=request.run_config,
        )
        assert result.success
        target = ds.dataset("lake/warehouse/customers", format="parquet").to_table()
        assert sorted(target.to_pylist(), key=lambda r: r["customer_id"]) == [
            {"customer_id": 1, "name": "ann"},
            {"customer_id": 2, "name": "bobby"},  # on_duplicate_keys="last"
        ]
        assert not (inbox / "export-1.parquet").exists()
        assert list((inbox / "_processed").rglob("export-1.parquet"))

        # The daily drop folder: the schedule's run merges the day that closed.
        day = tmp_path / "lake/inbox/returns/2026-01-02"
        day.mkdir(parents=True)
        pq.write_table(pa.table({"return_id": [7, 8]}), day / "r.parquet")
        schedule = defs.resolve_schedule_def("warehouse_returns_job_schedule")
        assert schedule.cron_schedule == "0 1 * * *"
        job = defs.resolve_job_def("warehouse_returns_job")
        assert job.execute_in_process(instance=instance, partition_key="2026-01-02").success
    returns = ds.dataset("lake/warehouse/returns", format="parquet").to_table()
    assert sorted(returns["return_id"].to_pylist()) == [7, 8]


def test_the_components_yaml_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster.components.testing import create_defs_folder_sandbox

    [text] = re.findall(r"```yaml\n(# src/<project>/defs/.*?)```", README.read_text(), re.S)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    with create_defs_folder_sandbox() as sandbox:
        folder = sandbox.defs_folder_path / "customers"
        folder.mkdir()
        (folder / "defs.yaml").write_text(text)
        with sandbox.build_all_defs() as defs:
            key = dg.AssetKey(["warehouse", "customers"])
            asset = defs.resolve_assets_def(key)
            assert asset.op.retry_policy == dg.RetryPolicy(max_retries=2)
            assert [s.name for s in defs.sensors] == ["customers_inbox"]
            memory = defs.resources["memory"]
            assert memory.max_process_memory_mb.env_var_name == "CRM_MAX_MB"  # read per run
