"""End to end with the `dg` command line, as a new user's first hour goes: a fresh dg project
(the files `create-dagster project` writes), `dg list components` shows memsafe's,
`dg scaffold defs` writes a MergeComponent, `dg check defs` loads it, and `dg launch` merges a
file dropped into its inbox into the target, recording memsafe metadata and both checks in
the instance. The repository's own demo is a dg project too: `dg check defs` at its root.

dg finds components through the `dagster_dg_cli.registry_modules` entry point of the installed
package, so these tests skip (loudly) where memsafe-dagster was installed before it had one.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DG = Path(sys.executable).parent / "dg"

pytestmark = pytest.mark.slow


def registered() -> bool:
    group = importlib.metadata.entry_points(group="dagster_dg_cli.registry_modules")
    return any(ep.value == "memsafe_dagster" for ep in group)


@pytest.fixture(scope="module", autouse=True)
def _needs_dg() -> None:
    if not DG.exists():
        pytest.skip(f"DG CLI NOT INSTALLED next to {sys.executable}: pip install dagster-dg-cli")
    if not registered():
        pytest.skip(
            "MEMSAFE'S dagster_dg_cli.registry_modules ENTRY POINT IS NOT INSTALLED in this "
            "environment (installed before it existed): pip install -e . (make test does)"
        )


PYPROJECT = """\
[project]
name = "firsthour"
version = "0.1.0"
requires-python = ">=3.10"
dependencies = ["dagster", "memsafe-dagster"]

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "firsthour"
registry_modules = ["firsthour.components.*"]
"""

DEFINITIONS = """\
from pathlib import Path

from dagster import definitions, load_from_defs_folder


@definitions
def defs():
    return load_from_defs_folder(path_within_project=Path(__file__).parent)
"""


def new_project(root: Path) -> Path:
    """What `create-dagster project firsthour` writes (src layout, empty defs folder)."""
    package = root / "src" / "firsthour"
    (package / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "defs" / "__init__.py").write_text("")
    (package / "definitions.py").write_text(DEFINITIONS)
    return root


def run_dg(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(DG), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    return proc


def dg_env(project: Path, home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # The project's own package is importable as if pip-installed (create-dagster's flow).
    path = os.pathsep.join(p for p in (str(project / "src"), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "DAGSTER_HOME": str(home),
        "DAGSTER_DG_UPDATE_CHECK_ENABLED": "0",
    }


def test_a_fresh_dg_project_scaffolds_checks_and_launches_a_merge(tmp_path: Path) -> None:
    project = new_project(tmp_path / "firsthour")
    home = tmp_path / "dagster_home"
    env = dg_env(project, home)

    listed = run_dg("list", "components", "--json", cwd=project, env=env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    keys = {entry["key"] for entry in json.loads(listed.stdout)["items"]}
    assert {"memsafe_dagster.MergeComponent", "memsafe_dagster.MemoryResourceComponent"} <= keys

    params = {"asset_key": "warehouse/customers", "key_columns": ["customer_id"]}
    scaffold = run_dg(
        "scaffold",
        "defs",
        "memsafe_dagster.MergeComponent",
        "customers",
        "--json-params",
        json.dumps(params),
        cwd=project,
        env=env,
    )
    assert scaffold.returncode == 0, scaffold.stderr[-3000:]
    defs_yaml = project / "src" / "firsthour" / "defs" / "customers" / "defs.yaml"
    written = yaml.safe_load(defs_yaml.read_text())
    assert written["type"] == "memsafe_dagster.MergeComponent"
    assert written["attributes"]["key_columns"] == ["customer_id"]

    checked = run_dg("check", "defs", cwd=project, env=env)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr

    inbox = project / "data" / "inbox" / "warehouse_customers"
    inbox.mkdir(parents=True)
    export = pa.table(
        {"customer_id": pa.array(range(500), pa.int64()), "name": [f"c{i}" for i in range(500)]}
    )
    pq.write_table(export, inbox / "export_0001.parquet")

    launched = run_dg("launch", "--assets", "warehouse/customers", cwd=project, env=env)
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert "RUN_SUCCESS" in launched.stdout + launched.stderr

    target = project / "data" / "warehouse_customers"
    merged = ds.dataset(str(target)).to_table()
    assert sorted(merged["customer_id"].to_pylist()) == list(range(500))
    assert not list(inbox.glob("*.parquet"))  # archived under _processed/ after the commit
    key = dg.AssetKey(["warehouse", "customers"])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(key)
        assert event is not None
        meta = event.asset_materialization.metadata
        assert meta["memsafe/inserted"].value == 500
        assert meta["memsafe/pressure"].value == "normal"
        assert meta["memsafe/peak_rss_mb"].value > 20
        assert meta["memsafe/limit_source"].value in {"physical", "cgroup-v1", "cgroup-v2"}
        for check in ("unique_keys", "memory_headroom"):
            [record] = instance.event_log_storage.get_asset_check_execution_history(
                dg.AssetCheckKey(key, check), limit=5
            )
            assert record.status.value == "SUCCEEDED", (check, record.status)


def test_a_broken_attribute_fails_dg_check_defs_by_name(tmp_path: Path) -> None:
    """`dg check defs` loads the component: a bad strategy is refused with its name."""
    project = new_project(tmp_path / "broken")
    env = dg_env(project, tmp_path / "home")
    folder = project / "src" / "firsthour" / "defs" / "orders"
    folder.mkdir()
    (folder / "defs.yaml").write_text(
        textwrap.dedent(
            f"""
            type: memsafe_dagster.MergeComponent
            attributes:
              asset_key: warehouse/orders
              source: {{inbox: {tmp_path / "inbox"}}}
              target_path: {tmp_path / "wh"}
              key_columns: [order_id]
              strategy: merge_everything
            """
        )
    )
    checked = run_dg("check", "defs", cwd=project, env=env)
    assert checked.returncode != 0
    out = checked.stdout + checked.stderr
    assert "strategy" in out and "merge_everything" in out


def test_the_demo_is_a_dg_project(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MEMSAFE_DEMO_DATA": str(tmp_path / "demo"),
        "DAGSTER_HOME": str(tmp_path / "home"),
        "DAGSTER_DG_UPDATE_CHECK_ENABLED": "0",
    }
    (tmp_path / "home").mkdir()
    checked = run_dg("check", "defs", cwd=REPO, env=env)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    listed = run_dg("list", "defs", "--json", cwd=REPO, env=env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    defs = json.loads(listed.stdout)
    assets = {a["asset_key"] for a in defs["assets"]}
    assert {"orders_raw", "orders_clean", "warehouse_orders", "warehouse_customers"} <= assets
    assert {s["name"] for s in defs["sensors"]} >= {"customers_inbox", "memsafe_failure_sensor"}
    assert {s["name"] for s in defs["schedules"]} == {"orders_daily"}
