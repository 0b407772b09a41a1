"""The Dagster layer on a real loopback S3 API (moto): the IO manager, a URL source, the inbox
sensor, the MergeComponent and the CLI, every one configured with ``storage_options`` only.

Two things hold throughout. Storage options may hold ``dg.EnvVar`` values, read when the run
(or the sensor tick) starts: the endpoint itself comes from an environment variable here, so a
run that did not read it could not reach the server. And anything that is not told where S3
is goes to a dead endpoint (``AWS_ENDPOINT_URL`` points at a closed port), so an operation
that forgot the storage options fails at once instead of reaching real AWS.

No ``from __future__ import annotations`` here: the assets below are read by Dagster.
"""

import json
import os
import re
import textwrap
import warnings
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3_helpers
from s3_helpers import new_bucket, s3fs_for

from memsafe_dagster import build_inbox_sensor, build_merge_asset
from memsafe_dagster.datasets import ChunkStream, PyarrowDatasetIO, merge_dataset
from memsafe_dagster.datasets.filesystem import (
    OBJECT_STORE_BLOCK_SIZE,
    block_bytes,
    resolve_filesystem,
)
from memsafe_dagster.datasets.merge.budget import MergeBudget
from memsafe_dagster.datasets.merge.source import source_filesystem
from memsafe_dagster.datasets.source import tabular_source
from memsafe_dagster.io_managers import ChunkedParquetIOManager
from memsafe_dagster.memory import MemoryMonitor
from memsafe_dagster.resources import MemoryMonitorResource

DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens, refused at once
DEAD = re.escape("127.0.0.1:9")
ENDPOINT_VAR, KEY_VAR, SECRET_VAR = "MEMSAFE_S3_ENDPOINT", "MEMSAFE_S3_KEY", "MEMSAFE_S3_SECRET"


@pytest.fixture(scope="module")
def endpoint():
    # Whatever is not told where S3 is fails fast rather than reaching AWS.
    dead = {"AWS_ENDPOINT_URL": DEAD_ENDPOINT, "AWS_MAX_ATTEMPTS": "1"}
    with s3_helpers.loopback_s3(dead) as url:
        yield url


@pytest.fixture
def secret(endpoint, monkeypatch):
    """The endpoint and credentials in the environment only; returns the secret."""
    value = "s3cr3t-" + os.urandom(6).hex()
    monkeypatch.setenv(ENDPOINT_VAR, endpoint)
    monkeypatch.setenv(KEY_VAR, "testing")
    monkeypatch.setenv(SECRET_VAR, value)
    return value


def env_options() -> dict:
    """Storage options naming environment variables, never holding their values."""
    return {
        "key": dg.EnvVar(KEY_VAR),
        "secret": dg.EnvVar(SECRET_VAR),
        "client_kwargs": {"endpoint_url": dg.EnvVar(ENDPOINT_VAR)},
        "use_listings_cache": False,
    }


def table(keys, value) -> pa.Table:
    keys = list(keys)
    return pa.table({"k": pa.array(keys, pa.int64()), "v": pa.array([value] * len(keys))})


def rows(endpoint: str, url: str) -> list[tuple[int, str]]:
    t = PyarrowDatasetIO(storage_options=s3_helpers.storage_options(endpoint)).read(url)
    return sorted(zip(t.column("k").to_pylist(), t.column("v").to_pylist(), strict=True))


def put_parquet(endpoint: str, path: str, t: pa.Table) -> None:
    with s3fs_for(endpoint).open(path, "wb") as fh:
        pq.write_table(t, fh)


def event_text(instance: dg.DagsterInstance, run_id: str) -> str:
    """Everything Dagster recorded about a run: its events (metadata included) and config."""
    run = instance.get_run_by_id(run_id)
    records = instance.all_logs(run_id)
    return json.dumps([str(r.dagster_event or r.user_message) for r in records]) + repr(
        run.run_config
    )


MEMORY = MemoryMonitorResource(min_system_available_mb=0)


# -- the IO manager ---------------------------------------------------------------------------


@dg.asset(io_manager_key="io_manager")
def s3_orders() -> pa.Table:
    return table(range(2_000), "raw")


@dg.asset(io_manager_key="io_manager")
def s3_eager(s3_orders: pa.Table) -> pa.Table:
    return s3_orders.filter(pa.compute.less(s3_orders["k"], 500))


@dg.asset(io_manager_key="io_manager")
def s3_streamed(s3_orders: ChunkStream) -> ChunkStream:
    return ChunkStream.from_batches(
        t.set_column(1, "v", pa.array(["streamed"] * t.num_rows)) for t in s3_orders
    )


def test_the_io_manager_writes_and_reads_s3_with_env_var_storage_options(
    endpoint, secret, monkeypatch
):
    bucket = new_bucket(endpoint)
    io = ChunkedParquetIOManager(
        base_path=f"s3://{bucket}/lake", storage_options=env_options(), chunk_size_rows=700
    )
    assert "storage_options" in io.get_resource_definition().config_schema.config_type.fields
    assert secret not in repr(io) and secret not in repr(io.configured_storage_options)
    resources = {"io_manager": io, "memory": MEMORY}
    instance = dg.DagsterInstance.ephemeral()
    # Read when the run starts: without the variable the run cannot find the server.
    monkeypatch.delenv(ENDPOINT_VAR)
    failed = dg.materialize(
        [s3_orders], resources=resources, instance=instance, raise_on_error=False
    )
    assert not failed.success
    assert ENDPOINT_VAR in str(failed.all_events) and "not set" in str(failed.all_events)
    monkeypatch.setenv(ENDPOINT_VAR, endpoint)
    result = dg.materialize(
        [s3_orders, s3_eager, s3_streamed], resources=resources, instance=instance
    )
    assert result.success
    assert rows(endpoint, f"s3://{bucket}/lake/s3_orders") == [(k, "raw") for k in range(2_000)]
    assert rows(endpoint, f"s3://{bucket}/lake/s3_eager") == [(k, "raw") for k in range(500)]
    streamed = rows(endpoint, f"s3://{bucket}/lake/s3_streamed")
    assert streamed == [(k, "streamed") for k in range(2_000)]
    meta = result.asset_materializations_for_node("s3_streamed")[0].metadata
    assert meta["memsafe/chunks"].value >= 3  # streamed in chunks of 700 rows
    text = event_text(instance, result.run_id)
    assert f"s3://{bucket}/lake/s3_orders" in text  # positive control: the metadata is there
    assert secret not in text


def test_filesystem_options_is_a_deprecated_alias_of_storage_options(endpoint, secret):
    bucket = new_bucket(endpoint)
    with pytest.warns(DeprecationWarning, match="use storage_options") as caught:
        io = ChunkedParquetIOManager(
            base_path=f"s3://{bucket}/old", filesystem_options=env_options()
        )
    assert caught[0].filename == __file__  # the warning points at the caller
    assert io.configured_storage_options["client_kwargs"]["endpoint_url"] == ENDPOINT_VAR
    result = dg.materialize([s3_orders], resources={"io_manager": io, "memory": MEMORY})
    assert result.success
    assert len(rows(endpoint, f"s3://{bucket}/old/s3_orders")) == 2_000
    with pytest.raises(ValueError, match="give storage_options only"):
        ChunkedParquetIOManager(
            base_path="/tmp/x", filesystem_options={"a": 1}, storage_options={"b": 2}
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns of nothing
        ChunkedParquetIOManager(base_path=f"s3://{bucket}/new", storage_options=env_options())


# -- a URL source -----------------------------------------------------------------------------


def test_a_url_source_is_read_through_the_targets_filesystem(endpoint):
    bucket = new_bucket(endpoint)
    io = PyarrowDatasetIO(storage_options=s3_helpers.storage_options(endpoint))
    io.write_dataset(table(range(5), "old"), f"s3://{bucket}/t")
    io.write_dataset(table([3, 4, 9], "src"), f"s3://{bucket}/src")
    # Positive control: resolved on its own, without the options, the URL goes elsewhere.
    with pytest.raises(Exception, match=DEAD):
        tabular_source(f"s3://{bucket}/src", filesystem=None, storage_options=None)
    result = io.merge(
        f"s3://{bucket}/src", f"s3://{bucket}/t", "upsert", "k", merge_min_system_available_mb=0
    )
    assert (result.inserted, result.updated) == (1, 2)
    assert rows(endpoint, f"s3://{bucket}/t") == [
        (0, "old"), (1, "old"), (2, "old"), (3, "src"), (4, "src"), (9, "src")
    ]  # fmt: skip
    # An explicit target filesystem (no storage options at all) serves the source too.
    fs = s3fs_for(endpoint)
    merge_dataset(
        f"s3://{bucket}/src", f"{bucket}/t", fs=fs, key_columns="k",
        merge_min_system_available_mb=0, strategy="delete",
    )  # fmt: skip
    assert [k for k, _ in rows(endpoint, f"s3://{bucket}/t")] == [0, 1, 2]
    assert source_filesystem(f"s3://{bucket}/src", fs) is fs
    assert source_filesystem("memory://elsewhere", fs) is None  # another protocol: its own


def test_a_url_source_into_a_local_target_uses_the_storage_options(endpoint, tmp_path):
    bucket = new_bucket(endpoint)
    put_parquet(endpoint, f"{bucket}/src/a.parquet", table([1, 2], "s3"))
    local = str(tmp_path / "t")
    merge_dataset(
        f"s3://{bucket}/src", local, key_columns="k", merge_min_system_available_mb=0,
        storage_options=s3_helpers.storage_options(endpoint),
    )  # fmt: skip
    assert pq.read_table(local).num_rows == 2
    with pytest.raises(Exception, match=DEAD):  # control: without them, elsewhere
        merge_dataset(f"s3://{bucket}/src", local, key_columns="k")


# -- the inbox sensor and its runs ------------------------------------------------------------


def test_the_inbox_sensor_on_an_s3_inbox_launches_runs_that_merge_it(endpoint, secret):
    bucket = new_bucket(endpoint)
    inbox, target = f"s3://{bucket}/inbox", f"s3://{bucket}/customers"
    merged = build_merge_asset(
        "s3_customers", source=inbox, target_path=target, key_columns="k",
        on_duplicate_keys="last", storage_options=env_options(),
    )  # fmt: skip
    sensor = build_inbox_sensor(name="s3_customers_inbox", target=merged, memory_threshold=None)
    defs = dg.Definitions(
        assets=[merged],
        sensors=[sensor],
        resources={"memory": MEMORY, "io_manager": dg.mem_io_manager},
    )
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
        return sensor.evaluate_tick(context)

    first = tick(None)
    assert not first.run_requests and "no new files" in first.skip_message
    put_parquet(endpoint, f"{bucket}/inbox/a.parquet", table(range(4), "a"))
    put_parquet(endpoint, f"{bucket}/inbox/b.parquet", table(range(2, 6), "b"))
    second = tick(first.cursor)
    [request] = second.run_requests
    files = request.run_config["ops"]["s3_customers"]["config"]["files"]
    assert sorted(f.rsplit("/", 1)[-1] for f in files) == ["a.parquet", "b.parquet"]
    job = defs.resolve_implicit_global_asset_job_def()
    run = job.execute_in_process(
        run_config=request.run_config, instance=instance, tags=request.tags
    )
    assert run.success
    assert [k for k, _ in rows(endpoint, target)] == list(range(6))
    assert not s3fs_for(endpoint).glob(f"{bucket}/inbox/*.parquet")  # archived after commit
    third = tick(second.cursor)
    assert not third.run_requests  # nothing new: the archived files are forgotten
    text = event_text(instance, run.run_id)
    assert "memsafe/inbox_files" in text and secret not in text
    assert secret not in repr(merged) and secret not in repr(sensor)


# -- the component ----------------------------------------------------------------------------


def test_a_merge_component_takes_storage_options_from_the_environment(
    endpoint, secret, monkeypatch
):
    from dagster.components.testing import create_defs_folder_sandbox

    bucket = new_bucket(endpoint)
    put_parquet(endpoint, f"{bucket}/inbox/a.parquet", table(range(3), "yaml"))
    monkeypatch.setenv("MEMSAFE_S3_BUCKET", bucket)
    with create_defs_folder_sandbox() as sandbox:
        folder = Path(sandbox.defs_folder_path) / "crm"
        folder.mkdir(parents=True)
        (folder / "defs.yaml").write_text(
            textwrap.dedent(
                """
                type: memsafe_dagster.MergeComponent
                attributes:
                  asset_key: lake/crm
                  source:
                    inbox: "s3://{{ env.MEMSAFE_S3_BUCKET }}/inbox"
                  target_path: "s3://{{ env.MEMSAFE_S3_BUCKET }}/crm"
                  key_columns: [k]
                  storage_options:
                    key: "{{ env_var('MEMSAFE_S3_KEY') }}"
                    secret: "{{ env_var('MEMSAFE_S3_SECRET') }}"
                    client_kwargs:
                      endpoint_url: "{{ env_var('MEMSAFE_S3_ENDPOINT') }}"
                    use_listings_cache: false
                  memory:
                    min_system_available_mb: 0
                """
            )
        )
        monkeypatch.setenv(ENDPOINT_VAR, DEAD_ENDPOINT)  # what the definitions would see
        with sandbox.build_all_defs() as defs:
            merge = defs.resolve_assets_def(dg.AssetKey(["lake", "crm"]))
            # The values are read when the run starts: it reaches the server named now.
            monkeypatch.setenv(ENDPOINT_VAR, endpoint)
            instance = dg.DagsterInstance.ephemeral()
            result = dg.materialize([merge], instance=instance)
            assert result.success
            text = event_text(instance, result.run_id)
    assert rows(endpoint, f"s3://{bucket}/crm") == [(k, "yaml") for k in range(3)]
    assert "memsafe/inserted" in text and secret not in text


# -- the CLI ----------------------------------------------------------------------------------


def test_cli_merges_an_s3_url_source_into_an_s3_target_with_storage_options(endpoint, tmp_path):
    from memsafe_dagster.cli import main

    bucket = new_bucket(endpoint)
    io = PyarrowDatasetIO(storage_options=s3_helpers.storage_options(endpoint))
    io.write_dataset(table(range(3), "a"), f"s3://{bucket}/t")
    io.write_dataset(table([2, 8], "url"), f"s3://{bucket}/src")
    local = tmp_path / "local.parquet"
    pq.write_table(table([9], "local"), local)
    flags = ["--key", "k", "--min-available", "0", "--no-progress"]
    option = ["--storage-option", f"client_kwargs.endpoint_url={endpoint}"]
    assert main(["merge", f"s3://{bucket}/src", f"s3://{bucket}/t", *flags, *option]) == 0
    assert main(["merge", str(local), f"s3://{bucket}/t", *flags, *option]) == 0  # a local file
    expected = [(0, "a"), (1, "a"), (2, "url"), (8, "url"), (9, "local")]
    assert rows(endpoint, f"s3://{bucket}/t") == expected
    assert main(["recover", f"s3://{bucket}/t", *option, "--json"]) == 0
    # Controls: no options (the default endpoint), and a bad one (exit status 2).
    with pytest.raises(Exception, match=DEAD):
        main(["merge", f"s3://{bucket}/src", f"s3://{bucket}/t", *flags])
    assert main(["merge", str(local), f"s3://{bucket}/t", *flags, "--storage-option", "x"]) == 2


# -- memory on object stores ------------------------------------------------------------------


def test_s3_files_get_bounded_buffers_unless_the_options_say_otherwise(endpoint):
    options = {**s3_helpers.storage_options(endpoint), "skip_instance_cache": True}
    fs, _ = resolve_filesystem("s3://b/x", storage_options=options)
    assert fs.default_block_size == OBJECT_STORE_BLOCK_SIZE == block_bytes(fs)
    assert fs.default_cache_type == "readahead"
    mine, _ = resolve_filesystem(
        "s3://b/x", storage_options={**options, "default_block_size": 6 << 20}
    )
    assert mine.default_block_size == 6 << 20  # the user's options win
    bucket = new_bucket(endpoint)
    payload = os.urandom(1 << 20)
    parts = {}
    for name, f in (("bounded", fs), ("s3fs default", s3fs_for(endpoint))):
        with f.open(f"{bucket}/{name}", "wb") as out:
            for _ in range(20):
                out.write(payload)
            parts[name] = len(out.parts or [])  # parts uploaded before the close
            buffered = out.buffer.tell()
        assert f.size(f"{bucket}/{name}") == 20 << 20
        if name == "bounded":
            assert buffered < 2 * OBJECT_STORE_BLOCK_SIZE
    # 20 MiB in 8 MiB parts; the stock 50 MiB block holds the whole file in memory instead.
    assert parts == {"bounded": 2, "s3fs default": 0}
    assert block_bytes(resolve_filesystem("/tmp")[0]) == 0


def test_the_merge_budget_counts_object_store_buffers_per_file_in_flight():
    monitor = MemoryMonitor(max_pyarrow_mb=512, max_process_memory_mb=1024)
    figures = {"row_group_rows": 100_000, "row_bytes": 24.0, "source_rows": 1_000_000}
    local = MergeBudget.of(monitor, _options())
    s3 = MergeBudget.of(monitor, _options(), file_block_bytes=50 << 20)
    assert local.open_files_bytes == 0 and s3.open_files_bytes == 6 * (50 << 20)
    wanted = 8
    on_disk = local.affordable_workers(wanted, current_rss_bytes=100 << 20, **figures)
    on_s3 = s3.affordable_workers(wanted, current_rss_bytes=100 << 20, **figures)
    assert on_disk == wanted and 1 <= on_s3 < on_disk


def _options():
    from memsafe_dagster.datasets.merge.options import MergeOptions

    return MergeOptions.from_kwargs({})


def test_the_readme_io_manager_example_runs_on_s3(endpoint, tmp_path):
    bucket = new_bucket(endpoint)
    env = {"MEMSAFE_LAKE": f"s3://{bucket}/lake", "DAGSTER_HOME": str(tmp_path)}
    run = s3_helpers.run_readme_block(
        endpoint, "ChunkedParquetIOManager(", "MEMSAFE_LAKE", env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == "True"
    assert [k for k, _ in rows_by_id(endpoint, f"s3://{bucket}/lake/event_ids")] == [1, 2, 3]
    assert "testing" not in run.stderr  # the secret is in no log line


def rows_by_id(endpoint: str, url: str) -> list[tuple[int, None]]:
    t = PyarrowDatasetIO(storage_options=s3_helpers.storage_options(endpoint)).read(url)
    return sorted((k, None) for k in t.column("id").to_pylist())
