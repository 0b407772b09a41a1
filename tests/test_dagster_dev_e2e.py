"""End to end through `dagster dev -w workspace.yaml`: the webserver and the daemon on a free
loopback port with a temporary DAGSTER_HOME. A run of the demo merge is launched through the
GraphQL API and its memsafe metadata read back the same way; then a Parquet file dropped into the
inbox makes the daemon's sensor launch a run that merges it. Every process started here is
stopped by its PID (and its process group), and the test checks that none survives."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.dataset as ds
import pytest
import requests
from browser_helpers import _default_sigint, free_port

from memsafe_dagster.demo import data
from memsafe_dagster.demo.run import ensure_dagster_home

REPO = Path(__file__).resolve().parent.parent
DAGSTER = Path(sys.executable).parent / "dagster"
LOCATION = "memsafe_demo"
REPOSITORY = "__repository__"
DAY = "2025-01-01"


class DagsterDev:
    """`dagster dev` and every process it starts, tracked by PID."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/graphql"
        self.log_path = log
        self._log = log.open("wb")
        argv = [str(DAGSTER), "dev", "-w", str(REPO / "workspace.yaml")]
        argv += ["-h", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_default_sigint,
            start_new_session=True,
        )
        self.seen: dict[int, str] = {}

    def remember_children(self) -> None:
        """Note every descendant now alive (the code server, webserver, daemon, runs)."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, " ".join(child.cmdline()[:4]))
        except psutil.Error:
            pass

    def query(self, query: str, **variables: Any) -> dict[str, Any]:
        response = requests.post(
            self.url, json={"query": query, "variables": variables}, timeout=30
        )
        assert response.status_code == 200, response.text[:2000]
        body = response.json()
        assert "errors" not in body, body["errors"]
        return body["data"]

    def log_tail(self) -> str:
        return self.log_path.read_bytes()[-6000:].decode(errors="replace")

    def wait_until_loaded(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"dagster dev exited:\n{self.log_tail()}"
            try:
                entries = self.query(WORKSPACE)["workspaceOrError"]["locationEntries"]
                last = entries
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    self.remember_children()
                    return
            except (requests.ConnectionError, requests.Timeout, AssertionError) as exc:
                last = exc
            time.sleep(0.5)
        raise AssertionError(f"dagster dev not ready: {last}\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGINT to dagster dev (it stops its children), then SIGTERM, then the group."""
        self.remember_children()
        pgid = self.proc.pid  # start_new_session: its own process group
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGTERM, 10)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        if self.proc.poll() is None:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.2)
        for pid in self.alive():  # anything left that we started: by PID
            os.kill(pid, signal.SIGKILL)
        self._log.close()

    def alive(self) -> list[int]:
        out = []
        for pid in self.seen:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.NoSuchProcess:
                continue
        return out


WORKSPACE = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"

LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""

RUN = """
query($runId: ID!) {
  runOrError(runId: $runId) { ... on Run { runId status tags { key value } } }
}"""

RUNS = """
query($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { runId status tags { key value } } } }
}"""

MATERIALIZATION = """
query($key: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $key) {
    ... on Asset {
      assetMaterializations(limit: 1, partitions: $partitions) {
        runId
        partition
        metadataEntries {
          label
          ... on IntMetadataEntry { intRepr }
          ... on FloatMetadataEntry { floatValue }
          ... on TextMetadataEntry { text }
          ... on JsonMetadataEntry { jsonString }
          ... on PathMetadataEntry { path }
        }
      }
      definition {
        assetChecksOrError {
          ... on AssetChecks {
            checks {
              name
              executionForLatestMaterialization { status evaluation { success } }
            }
          }
        }
      }
    }
  }
}"""

SENSOR = """
query($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    ... on Sensor { name sensorState { status } }
  }
}"""

START_SENSOR = """
mutation($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status } }
    ... on PythonError { message }
  }
}"""


def entry_value(entry: dict[str, Any]) -> Any:
    if "intRepr" in entry:
        return int(entry["intRepr"])  # IntMetadataEntry.intValue is 32-bit
    for field in ("floatValue", "text", "path"):
        if field in entry:
            return entry[field]
    if "jsonString" in entry:
        return json.loads(entry["jsonString"])
    return None


def wait_for_run(dev: DagsterDev, run_id: str, timeout_s: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dev.remember_children()
        run = dev.query(RUN, runId=run_id)["runOrError"]
        if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish\n{dev.log_tail()}")


@pytest.mark.slow
def test_dagster_dev_launches_the_demo_merge_and_the_sensor_merges_the_inbox(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    home = ensure_dagster_home(data_dir / "dagster_home")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MEMSAFE_DEMO_DATA": str(data_dir),
        "MEMSAFE_DEMO_ORDERS_PER_DAY": "4000",
        "MEMSAFE_DEMO_CHUNK_ROWS": "1500",
        "MEMSAFE_DEMO_SENSOR_INTERVAL": "1",
        "MEMSAFE_DEMO_START_DATE": DAY,
    }
    dev = DagsterDev(env, tmp_path, tmp_path / "dagster-dev.log")
    try:
        dev.wait_until_loaded()
        assert len(dev.seen) >= 3, dev.seen  # code server, webserver, daemon

        # 1. The demo's orders job for one day, launched through GraphQL.
        launched = dev.query(
            LAUNCH,
            params={
                "selector": {
                    "repositoryLocationName": LOCATION,
                    "repositoryName": REPOSITORY,
                    "jobName": "orders_job",
                },
                "runConfigData": {},
                "executionMetadata": {"tags": [{"key": "dagster/partition", "value": DAY}]},
            },
        )["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run = wait_for_run(dev, launched["run"]["runId"])
        assert run["status"] == "SUCCESS", dev.log_tail()

        asset = dev.query(MATERIALIZATION, key={"path": ["warehouse_orders"]}, partitions=[DAY])
        [materialization] = asset["assetOrError"]["assetMaterializations"]
        assert materialization["runId"] == run["runId"] and materialization["partition"] == DAY
        meta = {e["label"]: entry_value(e) for e in materialization["metadataEntries"]}
        warehouse = ds.dataset(str(data_dir / "warehouse" / "orders")).to_table()
        assert meta["memsafe/inserted"] == meta["dagster/row_count"] == warehouse.num_rows
        assert 3_900 < warehouse.num_rows < 4_000  # a few dirty rows cleaned away
        assert meta["memsafe/updated"] == 0 and meta["memsafe/deleted"] == 0
        assert meta["memsafe/merge"]["source_count"] == warehouse.num_rows
        assert meta["memsafe/pressure"] == "normal"
        assert 20 < meta["memsafe/peak_rss_mb"] < meta["memsafe/limit_mb"]
        assert meta["memsafe/limit_source"] in {"physical", "cgroup-v1", "cgroup-v2"}
        assert meta["memsafe/headroom_mb"] == pytest.approx(
            meta["memsafe/limit_mb"] - meta["memsafe/peak_rss_mb"], abs=0.02
        )
        assert meta["memsafe/chunk_size_rows"] == 1_500 and meta["memsafe/chunks"] == 3
        assert Path(meta["dagster/uri"]) == data_dir / "warehouse" / "orders"
        checks = asset["assetOrError"]["definition"]["assetChecksOrError"]["checks"]
        assert {
            c["name"]: c["executionForLatestMaterialization"]["evaluation"]["success"]
            for c in checks
        } == {"unique_keys": True, "memory_headroom": True}

        # 2. A file in the inbox: the daemon's sensor launches a run that merges it.
        selector = {
            "repositoryLocationName": LOCATION,
            "repositoryName": REPOSITORY,
            "sensorName": "customers_inbox",
        }
        state = dev.query(SENSOR, selector=selector)["sensorOrError"]["sensorState"]
        if state["status"] != "RUNNING":
            started = dev.query(START_SENSOR, selector=selector)["startSensor"]
            assert started["sensorState"]["status"] == "RUNNING", started
        inbox = data_dir / "inbox" / "customers"
        dropped = data.drop_customer_export(inbox, 300, 0)
        deadline = time.monotonic() + 120
        sensor_runs: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not sensor_runs:
            dev.remember_children()
            runs = dev.query(
                RUNS, filter={"tags": [{"key": "dagster/sensor_name", "value": "customers_inbox"}]}
            )["runsOrError"]["results"]
            sensor_runs = runs
            time.sleep(0.5)
        assert len(sensor_runs) == 1, dev.log_tail()
        run = wait_for_run(dev, sensor_runs[0]["runId"])
        assert run["status"] == "SUCCESS", dev.log_tail()
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert tags["memsafe/inbox_files"] == "1" and tags["dagster/run_key"].startswith("inbox-")

        customers = ds.dataset(str(data_dir / "warehouse" / "customers")).to_table()
        assert customers.num_rows == 300
        assert sorted(customers["customer_id"].to_pylist()) == list(range(300))
        assert not dropped.exists()
        assert list((inbox / "_processed").rglob(dropped.name))
        asset = dev.query(MATERIALIZATION, key={"path": ["warehouse_customers"]}, partitions=None)
        [materialization] = asset["assetOrError"]["assetMaterializations"]
        meta = {e["label"]: entry_value(e) for e in materialization["metadataEntries"]}
        assert meta["memsafe/inserted"] == 300 and meta["memsafe/inbox_files"] == [dropped.name]
    finally:
        dev.stop()
    assert dev.proc.returncode is not None
    assert dev.alive() == [], {pid: dev.seen[pid] for pid in dev.alive()}
