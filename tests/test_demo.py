"""The demo project: settings from the environment, the generated data, the definitions that
workspace.yaml loads, and `memsafe demo` (the main job) run as a command, twice."""

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
import yaml

from memsafe_dagster.demo import data
from memsafe_dagster.demo.settings import DemoSettings

REPO = Path(__file__).resolve().parent.parent
MEMSAFE = Path(sys.executable).parent / "memsafe"


# -- settings -------------------------------------------------------------------------------------


def test_settings_default_to_a_small_demo_under_dot_memsafe_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = DemoSettings.from_env({})
    assert settings.data_dir == tmp_path / ".memsafe_data"
    assert (settings.orders_per_day, settings.days, settings.chunk_rows) == (100_000, 3, 25_000)
    today = dt.datetime.now(dt.timezone.utc).date()
    # The demo's days end yesterday, the last complete day: they are exactly the partitions.
    assert settings.partition_keys() == [
        (today - dt.timedelta(days=d)).isoformat() for d in (3, 2, 1)
    ]
    assert settings.dagster_home == tmp_path / ".memsafe_data" / "dagster_home"
    custom = DemoSettings.from_env(
        {
            "MEMSAFE_DEMO_DATA": str(tmp_path / "d"),
            "MEMSAFE_DEMO_ORDERS_PER_DAY": "1_000",
            "MEMSAFE_DEMO_DAYS": "2",
            "MEMSAFE_DEMO_START_DATE": "2024-02-28",
        }
    )
    assert custom.data_dir == tmp_path / "d" and custom.orders_per_day == 1_000
    assert custom.partition_keys() == ["2024-02-28", "2024-02-29"]
    assert custom.day_index("2024-03-01") == 2


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MEMSAFE_DEMO_DAYS": "0"}, "MEMSAFE_DEMO_DAYS must be a positive integer, got '0'"),
        ({"MEMSAFE_DEMO_CHUNK_ROWS": "lots"}, "MEMSAFE_DEMO_CHUNK_ROWS must be a positive"),
        ({"MEMSAFE_DEMO_START_DATE": "yesterday"}, "MEMSAFE_DEMO_START_DATE must be a date"),
    ],
)
def test_bad_settings_name_their_variable(env: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoSettings.from_env(env)


# -- data -----------------------------------------------------------------------------------------


def day(key: str, index: int, per_day: int = 1_000) -> pa.Table:
    return pa.Table.from_batches(data.order_batches(key, index, per_day, 300, 50))


def test_orders_are_new_ids_then_updates_of_earlier_ones_in_chunks() -> None:
    first = day("2025-01-01", 0)
    assert first.schema == data.ORDER_SCHEMA and first.num_rows == 1_000
    assert first["order_id"].to_pylist() == list(range(1_000))
    third = day("2025-01-03", 2)
    assert third.num_rows == 1_100
    ids = third["order_id"].to_pylist()
    assert len(set(ids)) == 1_100  # one row per order within a day
    assert ids[:1_000] == list(range(2_000, 3_000))
    updates = ids[1_000:]
    assert all(0 <= i < 2_000 for i in updates)
    assert set(third.slice(1_000)["status"].to_pylist()) <= {"shipped", "delivered", "returned"}
    assert day("2025-01-03", 2).equals(third)  # seeded by the day
    assert [b.num_rows for b in data.order_batches("2025-01-03", 2, 1_000, 300, 50)] == [
        300,
        300,
        300,
        200,
    ]


def test_cleaning_drops_dirty_rows_and_normalizes() -> None:
    raw = day("2025-01-02", 1, per_day=5_000)
    clean = data.clean_orders(raw)
    assert clean.schema == data.CLEAN_SCHEMA
    dropped = raw.num_rows - clean.num_rows
    assert 0 < dropped < raw.num_rows * 0.03
    assert clean["customer_id"].null_count == 0 and pc.min(clean["amount"]).as_py() > 0
    assert set(clean["currency"].to_pylist()) <= {"EUR", "USD", "GBP"}
    usd = clean.filter(pc.equal(clean["currency"], "USD"))
    assert usd["amount_eur"].to_pylist()[0] == round(usd["amount"].to_pylist()[0] * 0.92, 2)


def test_customer_exports_are_full_then_updates(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    assert data.next_export_version(inbox) == 0
    full = data.drop_customer_export(inbox, 200, 0)
    update = data.drop_customer_export(inbox, 200, 1)
    assert data.next_export_version(inbox) == 2
    assert sorted(p.name for p in inbox.iterdir()) == [full.name, update.name]  # no partials
    ids = ds.dataset(str(update)).to_table()["customer_id"].to_pylist()
    assert len([i for i in ids if i < 200]) == 20 and len([i for i in ids if i >= 200]) == 10


# -- definitions ----------------------------------------------------------------------------------


def test_workspace_loads_the_demo_definitions(tmp_path: Path) -> None:
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    [entry] = workspace["load_from"]
    module = entry["python_module"]
    assert (module["module_name"], module["attribute"]) == (
        "memsafe_dagster.demo.definitions",
        "defs",
    )
    code = (
        "import dagster as dg\n"
        "from memsafe_dagster.demo.definitions import defs\n"
        "dg.Definitions.validate_loadable(defs)\n"
        "print(sorted(j.name for j in defs.resolve_all_job_defs()))\n"
        "print(sorted(s.name for s in defs.sensors), [s.name for s in defs.schedules])\n"
        "print(defs.resolve_job_def('orders_job').partitions_def.get_partition_keys())\n"
        "print(defs.resources['memory'] is defs.resources['io_manager'].memory)\n"
    )
    env = {**os.environ, "MEMSAFE_DEMO_DATA": str(tmp_path / "d")}
    env.pop("MEMSAFE_DEMO_START_DATE", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs, sensors, partitions, shared = proc.stdout.splitlines()
    assert "'orders_job'" in jobs and "'customers_job'" in jobs
    assert sensors == "['customers_inbox', 'memsafe_failure_sensor'] ['orders_daily']"
    # Exactly the demo's days (was every day since 2025-01-01: ~700 partitions, and the UI's
    # plots, which read the latest 120 partition keys, were empty).
    assert partitions == str(DemoSettings.from_env({}).partition_keys())
    assert shared == "True"  # one memory resource object for the merges and the IO manager


def test_the_demo_merges_are_declared_in_defs_yaml() -> None:
    folder = REPO / "memsafe_dagster" / "demo" / "defs"
    types = {
        path.parent.name: yaml.safe_load(path.read_text())["type"]
        for path in folder.glob("*/defs.yaml")
    }
    assert types == {
        "warehouse_orders": "memsafe_dagster.MergeComponent",
        "warehouse_customers": "memsafe_dagster.MergeComponent",
        "memory": "memsafe_dagster.MemoryResourceComponent",
    }


def test_a_dates_order_ids_do_not_depend_on_the_first_demo_day() -> None:
    per_day = {"MEMSAFE_DEMO_ORDERS_PER_DAY": "1000"}
    early = DemoSettings.from_env({**per_day, "MEMSAFE_DEMO_START_DATE": "2025-01-01"})
    late = DemoSettings.from_env({**per_day, "MEMSAFE_DEMO_START_DATE": "2025-01-02"})

    def new_ids(settings: DemoSettings) -> list[int]:
        rows = pa.Table.from_batches(
            data.order_batches(
                "2025-01-02",
                settings.day_index("2025-01-02"),
                1_000,
                500,
                50,
                first_id=settings.first_order_id,
            )
        )
        return rows["order_id"].to_pylist()[:1_000]

    # Day 1828 since 2020-01-01 (ID_EPOCH), whichever day the demo started on.
    assert new_ids(early) == new_ids(late) == list(range(1_828_000, 1_829_000))


# -- the main job ---------------------------------------------------------------------------------


DAYS = DemoSettings.from_env({"MEMSAFE_DEMO_DAYS": "2"}).partition_keys()


def memsafe_demo(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MEMSAFE_DEMO_DATA": str(data_dir),
        "MEMSAFE_DEMO_ORDERS_PER_DAY": "3000",
        "MEMSAFE_DEMO_DAYS": "2",
        "MEMSAFE_DEMO_CUSTOMERS": "400",
        "MEMSAFE_DEMO_CHUNK_ROWS": "1000",
    }
    env.pop("DAGSTER_HOME", None)
    env.pop("MEMSAFE_DEMO_START_DATE", None)
    return subprocess.run(
        [str(MEMSAFE), "demo", *args],
        env=env,
        cwd=data_dir.parent,
        capture_output=True,
        text=True,
        timeout=240,
    )


def report_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """The report's table: (asset, partition) -> the rest of the line, split."""
    lines = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in {
            "orders_raw",
            "orders_clean",
            "warehouse_orders",
            "warehouse_customers",
        }:
            lines[(parts[0], parts[1])] = parts[2:]
    return lines


@pytest.mark.slow
def test_memsafe_demo_runs_the_graph_and_reports_each_asset(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    first = memsafe_demo(data_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert "memsafe demo: 2 day(s) x 3,000 orders" in out
    assert "3 runs in" in out and "all succeeded" in out
    assert "`memsafe demo --ui` shows the runs" in out and "make ui" not in out
    rows = report_rows(out)
    assert set(rows) == {
        (asset, day) for asset in ("orders_raw", "orders_clean", "warehouse_orders") for day in DAYS
    } | {("warehouse_customers", "-")}
    # rows, peak RSS "N MB", limit "N MB (source)", pressure, then merge counts
    raw = rows[("orders_raw", DAYS[1])]
    assert raw[0] == "3,300" and raw[2] == "MB" and raw[4] == "MB" and raw[6] == "normal"
    assert raw[5].startswith("(") and raw[5].endswith(")")
    day1, day2 = rows[("warehouse_orders", DAYS[0])], rows[("warehouse_orders", DAYS[1])]
    clean1 = int(rows[("orders_clean", DAYS[0])][0].replace(",", ""))
    assert int(day1[7].replace(",", "")) == clean1 and day1[8] == "0"  # inserted, updated
    assert int(day2[8].replace(",", "")) > 250  # day 2 updates earlier orders
    assert "unique_keys ok, memory_headroom ok" in " ".join(day2)
    customers = rows[("warehouse_customers", "-")]
    assert customers[0] == "420" and customers[7] == "420"

    warehouse = ds.dataset(str(data_dir / "warehouse" / "orders")).to_table()
    assert warehouse.num_rows == int(day2[0].replace(",", ""))
    assert pc.count_distinct(warehouse["order_id"]).as_py() == warehouse.num_rows
    assert not list((data_dir / "inbox" / "customers").glob("*.parquet"))  # archived

    home = data_dir / "dagster_home"
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    assert config["concurrency"]["pools"]["default_limit"] == 1
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 3 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert {r.job_name for r in runs} == {"orders_job", "customers_job"}
        warnings = [
            entry.user_message
            for run in runs
            for entry in instance.all_logs(run.run_id)
            if "has no limit" in (entry.user_message or "")
        ]
        assert warnings == []  # the demo's instance gives the merge pools a limit
        # Every step was admitted through the container's ledger and records its increment.
        for key in ("warehouse_orders", "orders_clean"):
            meta = instance.get_latest_materialization_event(
                dg.AssetKey(key)
            ).asset_materialization.metadata
            assert meta["memsafe/admission_wait_s"].value >= 0
            assert meta["memsafe/admission_source"].value in ("metadata", "history", "default")
            assert 0 <= meta["memsafe/step_rss_mb"].value <= meta["memsafe/peak_rss_mb"].value

    # Again: the same days are updates now, and a new CRM export updates customers.
    second = memsafe_demo(data_dir)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    again = report_rows(second.stdout)
    day1 = again[("warehouse_orders", DAYS[0])]
    assert day1[7] == "0" and int(day1[8].replace(",", "")) == clean1
    customers = again[("warehouse_customers", "-")]
    assert customers[7] == "20" and customers[8] == "40"  # 20 new, 40 changed
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert len(instance.get_runs()) == 6

    # --fresh starts over; --prepare only makes the home.
    fresh = memsafe_demo(data_dir, "--fresh", "--days", "1")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert report_rows(fresh.stdout)[("warehouse_orders", DAYS[0])][8] == "0"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert len(instance.get_runs()) == 2
    other = tmp_path / "other"
    prepared = memsafe_demo(other, "--prepare")
    assert prepared.returncode == 0 and (other / "dagster_home" / "dagster.yaml").exists()
    assert not (other / "warehouse").exists()


@pytest.mark.slow
def test_memsafe_demo_ui_serves_the_demo_without_a_checkout(tmp_path: Path) -> None:
    """`memsafe demo --ui` (what the report points at): the web UI on the demo's home, the
    same code location as `make ui`; run from a directory with no Makefile or workspace."""
    import signal
    import time

    import requests
    from browser_helpers import free_port

    port = free_port()
    env = {**os.environ, "MEMSAFE_DEMO_DATA": str(tmp_path / "demo")}
    env.pop("DAGSTER_HOME", None)
    log = (tmp_path / "ui.log").open("wb")
    proc = subprocess.Popen(
        [str(MEMSAFE), "demo", "--ui", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        start_new_session=True,
    )
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
    try:
        deadline, entries = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
            try:
                body = requests.post(
                    f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=10
                ).json()
                entries = body["data"]["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["loadStatus"] == "LOADED":
                    break
            except (requests.RequestException, KeyError, TypeError, ValueError):
                pass
            time.sleep(0.5)
        assert entries == [{"name": "memsafe_demo", "loadStatus": "LOADED"}], entries
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
    text = (tmp_path / "ui.log").read_text()
    assert f"web UI on http://127.0.0.1:{port}" in text
    assert "SupersessionWarning" not in text
    assert (tmp_path / "demo" / "dagster_home" / "dagster.yaml").exists()
