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


def test_the_core_example_prints_what_it_says(tmp_path: Path) -> None:
    # A fresh interpreter, as a user runs it: its 384 MB budget is for that process alone.
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


def test_the_inbox_example_merges_a_dropped_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(python_examples()[0] + python_examples()[1], namespace)
    defs = namespace["defs"]
    customers, sensor = namespace["warehouse_customers"], namespace["customers_inbox"]
    inbox = tmp_path / "lake/inbox/customers"
    inbox.mkdir(parents=True)
    export = pa.table({"customer_id": [1, 2, 2], "name": ["ann", "bob", "bobby"]})
    pq.write_table(export, inbox / "export-1.parquet")
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(
            instance=instance,
            definitions=dg.Definitions(
                assets=[customers], sensors=[sensor], resources=defs.resources
            ),
        ) as context,
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
    schedule = namespace["orders_daily"]
    with_schedule = dg.Definitions(
        assets=[namespace[n] for n in ("orders_raw", "orders_clean", "warehouse_orders")],
        schedules=[schedule],
        resources=defs.resources,
    )
    assert with_schedule.resolve_schedule_def(schedule.name).cron_schedule == "0 1 * * *"
