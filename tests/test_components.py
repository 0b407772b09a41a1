"""MergeComponent and MemoryResourceComponent, loaded from YAML by Dagster's own component
machinery (``dagster.components.testing``: a temporary defs folder loaded like a dg project)
and materialized into real instances. The dg command line runs in test_dg_project.py.

No ``from __future__ import annotations`` here: the defs files written here define assets.
"""

import dataclasses
import inspect
import textwrap
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from dagster.components.testing import create_defs_folder_sandbox

import memsafe_dagster
from memsafe_dagster import MemoryResourceComponent, MergeComponent, build_merge_asset
from memsafe_dagster.components.merge import MERGE_ASSET_ARGUMENTS, SPELLED_OTHERWISE
from memsafe_dagster.datasets.merge import STRATEGIES
from memsafe_dagster.merge_asset import merge_spec_of
from memsafe_dagster.resources import MemoryMonitorResource


def drop(inbox: Path, name: str, ids: range, tag: str, key: str = "id") -> Path:
    inbox.mkdir(parents=True, exist_ok=True)
    table = pa.table({key: pa.array(ids, pa.int64()), "v": pa.array([tag] * len(ids))})
    pq.write_table(table, inbox / name)
    return inbox / name


def write_defs(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "defs.yaml").write_text(textwrap.dedent(text))
    return path


def spec_fields(spec: object) -> dict:
    """A merge spec as plain values (its MergeRequest compares by identity)."""
    out = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    request = spec.request
    out["request"] = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
    out["storage_options"] = dict(spec.storage_options)
    return out


def materializations(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> list:
    return [
        m
        for m in result.get_asset_materialization_events()
        if m.asset_key == key and m.step_materialization_data
    ]


# -- attributes -------------------------------------------------------------------------------


def test_source_is_an_upstream_asset_or_an_inbox() -> None:
    upstream = MergeComponent.from_attributes_dict(
        attributes={
            "asset_key": "warehouse/orders",
            "source": {"asset": "raw/orders"},
            "target_path": "/data/wh/orders",
            "key_columns": ["order_id"],
        }
    )
    assert upstream.asset_key == dg.AssetKey(["warehouse", "orders"])
    assert upstream.source.asset == dg.AssetKey(["raw", "orders"])
    inbox = MergeComponent.from_attributes_dict(
        attributes={
            "asset_key": "crm",
            "source": {"inbox": "s3://bucket/inbox", "pattern": "*.pq"},
            "target_path": "s3://bucket/crm",
            "key_columns": "id",
            "strategy": "insert",
        }
    )
    kwargs = inbox.merge_asset_kwargs()
    assert (kwargs["source"], kwargs["inbox_pattern"]) == ("s3://bucket/inbox", "*.pq")
    assert (kwargs["name"], kwargs["key_prefix"], kwargs["strategy"]) == ("crm", None, "insert")


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"strategy": "merge_everything"}, "strategy"),
        ({"source": {"table": "x"}}, "source"),
        ({"source": {"asset": "a", "inbox": "b"}}, "source"),
        ({"target_pth": "t"}, "target_pth"),
        ({"on_duplicate_keys": "newest"}, "on_duplicate_keys"),
    ],
)
def test_bad_attributes_are_refused_by_name(attributes: dict, message: str) -> None:
    base = {"asset_key": "a", "source": {"asset": "b"}, "target_path": "t", "key_columns": "id"}
    with pytest.raises(Exception, match=message):
        MergeComponent.from_attributes_dict(attributes={**base, **attributes})


def test_the_strategy_literal_is_the_merge_packages_strategy_table() -> None:
    field = MergeComponent.model_fields["strategy"]
    assert set(field.annotation.__args__) == set(STRATEGIES)


def test_every_factory_argument_is_an_attribute_of_the_same_name() -> None:
    """The component maps 1:1 onto build_merge_asset: an argument added to the factory needs a
    field here (or its YAML spelling named in SPELLED_OTHERWISE)."""
    parameters = {
        name
        for name, p in inspect.signature(build_merge_asset).parameters.items()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    covered = set(MERGE_ASSET_ARGUMENTS) | set(SPELLED_OTHERWISE)
    assert parameters == covered, parameters ^ covered
    assert set(MERGE_ASSET_ARGUMENTS) <= set(MergeComponent.model_fields)


def test_merge_options_cannot_shadow_an_attribute() -> None:
    component = MergeComponent.from_attributes_dict(
        attributes={
            "asset_key": "a",
            "source": {"asset": "b"},
            "target_path": "t",
            "key_columns": "id",
            "merge_options": {"strategy": "insert"},
        }
    )
    with pytest.raises(ValueError, match=r"merge_options \['strategy'\] are attributes"):
        component.merge_asset_kwargs()


def test_a_sensor_needs_an_inbox_source() -> None:
    component = MergeComponent.from_attributes_dict(
        attributes={
            "asset_key": "a",
            "source": {"asset": "b"},
            "target_path": "/t",
            "key_columns": "id",
            "sensor": {},
        }
    )
    with pytest.raises(ValueError, match="sensor: needs an inbox source"):
        dg.build_defs_for_component(component)


def test_the_component_builds_what_build_merge_asset_builds(tmp_path: Path) -> None:
    days = dg.DailyPartitionsDefinition(start_date="2024-01-01")
    attributes = {
        "asset_key": "warehouse/orders",
        "source": {"asset": "raw/orders"},
        "target_path": str(tmp_path / "wh" / "{partition_key}"),
        "key_columns": ["order_id", "line"],
        "strategy": "upsert",
        "partitions_def": {"type": "daily", "start_date": "2024-01-01"},
        "merge_chunk_size_rows": 5_000,
        "on_duplicate_keys": "last",
        "storage_options": {"auto_mkdir": True},
        "check_memory_mb": 64,
        "min_headroom_mb": 100,
        "retry_policy": {"max_retries": 2},
        "group_name": "warehouse",
        "description": "orders",
        "tags": {"team": "data"},
        "owners": ["team:data"],
        "merge_options": {"row_group_size": 1_000, "compression": "zstd"},
    }
    component = MergeComponent.from_attributes_dict(attributes=attributes)
    [built] = dg.build_defs_for_component(component).assets
    direct = build_merge_asset(
        "orders",
        key_prefix=["warehouse"],
        source=dg.AssetKey(["raw", "orders"]),
        target_path=str(tmp_path / "wh" / "{partition_key}"),
        key_columns=["order_id", "line"],
        strategy="upsert",
        partitions_def=days,
        merge_chunk_size_rows=5_000,
        on_duplicate_keys="last",
        storage_options={"auto_mkdir": True},
        check_memory_mb=64,
        min_headroom_mb=100,
        retry_policy=dg.RetryPolicy(max_retries=2),
        group_name="warehouse",
        description="orders",
        tags={"team": "data"},
        owners=["team:data"],
        row_group_size=1_000,
        compression="zstd",
    )
    assert spec_fields(merge_spec_of(built)) == spec_fields(merge_spec_of(direct))
    assert built.partitions_def == direct.partitions_def == days
    assert [(s.key, s.partitions_def) for s in built.check_specs] == [
        (s.key, s.partitions_def) for s in direct.check_specs
    ]
    built_spec, direct_spec = built.specs_by_key[built.key], direct.specs_by_key[direct.key]
    for field in ("metadata", "group_name", "description", "tags", "owners", "kinds", "deps"):
        assert getattr(built_spec, field) == getattr(direct_spec, field), field
    assert built.op.pool == direct.op.pool == merge_spec_of(direct).pool
    assert built.op.retry_policy == direct.op.retry_policy
    assert built.required_resource_keys == direct.required_resource_keys
    assert "memory" in built.required_resource_keys


# -- a defs folder, loaded and materialized ---------------------------------------------------


def test_an_inbox_merge_from_yaml_merges_with_env_values_read_when_the_run_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox, target = tmp_path / "inbox", tmp_path / "warehouse" / "crm"
    drop(inbox, "a.parquet", range(0, 6), "a")
    monkeypatch.setenv("CRM_INBOX", str(inbox))
    monkeypatch.setenv("CRM_MAX_MB", "1500")
    with create_defs_folder_sandbox() as sandbox:
        write_defs(
            sandbox.defs_folder_path,
            "crm",
            f"""
            type: memsafe_dagster.MergeComponent
            attributes:
              asset_key: warehouse/crm
              source:
                inbox: "{{{{ env('CRM_INBOX') }}}}"
              target_path: {target}
              key_columns: [id]
              on_duplicate_keys: last
              memory:
                max_process_memory_mb: "{{{{ env_int('CRM_MAX_MB') }}}}"
              sensor:
                minimum_interval_seconds: 5
                default_status: running
            post_processing:
              assets:
                - target: "*"
                  attributes:
                    tags: {{team: crm}}
            """,
        )
        (sandbox.defs_folder_path / "budget.py").write_text(
            textwrap.dedent(
                """
                import dagster as dg

                @dg.asset(required_resource_keys={"memory"})
                def budget(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
                    memory = context.resources.memory
                    return dg.MaterializeResult(
                        metadata={"max_process_memory_mb": memory.max_process_memory_mb}
                    )
                """
            )
        )
        with sandbox.build_all_defs() as defs:
            key = dg.AssetKey(["warehouse", "crm"])
            merge = defs.resolve_assets_def(key)
            assert merge.specs_by_key[key].tags["team"] == "crm"  # post_processing applies
            memory = defs.resources["memory"]
            assert isinstance(memory, MemoryMonitorResource)
            [sensor] = defs.sensors
            assert sensor.name == "crm_inbox"
            assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
            # The budget is read when the run starts, not when the definitions loaded.
            monkeypatch.setenv("CRM_MAX_MB", "1700")
            drop(inbox, "b.parquet", range(4, 9), "b")
            with dg.instance_for_test() as instance:
                result = dg.materialize(
                    [merge, defs.resolve_assets_def("budget")], instance=instance
                )
                assert result.success
                [budget] = materializations(result, dg.AssetKey("budget"))
                recorded = budget.step_materialization_data.materialization.metadata
                assert recorded["max_process_memory_mb"].value == 1700
                [event] = materializations(result, key)
                meta = event.step_materialization_data.materialization.metadata
                assert meta["memsafe/inserted"].value == 9
                assert meta["memsafe/pressure"].value == "normal"
                assert meta["memsafe/peak_rss_mb"].value > 20
                checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
                assert checks == {"unique_keys": True, "memory_headroom": True}
    rows = ds.dataset(str(target)).to_table().sort_by("id")
    assert rows["id"].to_pylist() == list(range(9))
    assert rows["v"].to_pylist() == ["a"] * 4 + ["b"] * 5  # b.parquet is newer: last wins
    assert not list(inbox.glob("*.parquet"))  # archived after the commit


def test_an_upstream_merge_with_partitions_and_a_schedule(tmp_path: Path) -> None:
    with create_defs_folder_sandbox() as sandbox:
        (sandbox.defs_folder_path / "raw.py").write_text(
            textwrap.dedent(
                """
                import dagster as dg
                import pyarrow as pa

                DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01")

                @dg.asset(key=["raw", "orders"], partitions_def=DAYS)
                def raw_orders(context: dg.AssetExecutionContext) -> pa.Table:
                    day = DAYS.get_partition_keys().index(context.partition_key)
                    return pa.table({"id": pa.array(range(day * 5, day * 5 + 8), pa.int64())})
                """
            )
        )
        write_defs(
            sandbox.defs_folder_path,
            "orders",
            f"""
            type: memsafe_dagster.MergeComponent
            attributes:
              asset_key: warehouse/orders
              source: {{asset: raw/orders}}
              target_path: {tmp_path / "wh"}
              key_columns: id
              partitions_def: {{type: daily, start_date: "2024-01-01"}}
              retry_policy: {{max_retries: 2}}
              schedule: {{name: orders_daily, job_name: orders_job, hour_of_day: 1}}
            """,
        )
        write_defs(
            sandbox.defs_folder_path,
            "memory",
            """
            type: memsafe_dagster.MemoryResourceComponent
            attributes:
              memory: {profile: development}
            """,
        )
        with sandbox.build_all_defs() as defs:
            merge = defs.resolve_assets_def(dg.AssetKey(["warehouse", "orders"]))
            assert all(s.partitions_def == merge.partitions_def for s in merge.check_specs)
            assert merge.op.retry_policy == dg.RetryPolicy(max_retries=2)
            schedule = defs.resolve_schedule_def("orders_daily")
            assert schedule.cron_schedule == "0 1 * * *"
            job = defs.resolve_job_def("orders_job")
            assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {
                "raw/orders",
                "warehouse/orders",
            }
            assert defs.resources["memory"].profile == "development"
            with dg.instance_for_test() as instance:
                for day in ("2024-01-01", "2024-01-02"):
                    assert job.execute_in_process(instance=instance, partition_key=day).success
    assert ds.dataset(str(tmp_path / "wh")).count_rows() == 13  # ids 0..12, 5..7 updated


def test_merge_components_with_one_memory_config_share_one_resource(tmp_path: Path) -> None:
    """Dagster merges the components' Definitions and refuses two objects under one key."""
    with create_defs_folder_sandbox() as sandbox:
        for name in ("a", "b"):
            write_defs(
                sandbox.defs_folder_path,
                name,
                f"""
                type: memsafe_dagster.MergeComponent
                attributes:
                  asset_key: wh/{name}
                  source: {{inbox: {tmp_path / name}}}
                  target_path: {tmp_path / "t" / name}
                  key_columns: [id]
                  memory: {{max_process_memory_mb: 512}}
                """,
            )
        write_defs(
            sandbox.defs_folder_path,
            "c",
            f"""
            type: memsafe_dagster.MergeComponent
            attributes:
              asset_key: wh/c
              source: {{inbox: {tmp_path / "c"}}}
              target_path: {tmp_path / "t" / "c"}
              key_columns: [id]
              memory_resource_key: small_memory
              memory: {{max_process_memory_mb: 256}}
            """,
        )
        with sandbox.build_all_defs() as defs:
            dg.Definitions.validate_loadable(defs)
            assert set(defs.resources) == {"memory", "small_memory"}
            assert defs.resources["memory"].max_process_memory_mb == 512
            assert defs.resources["small_memory"].max_process_memory_mb == 256


def test_two_budgets_under_one_key_are_refused(tmp_path: Path) -> None:
    """The positive control of the sharing above: different configs are different objects."""
    with create_defs_folder_sandbox() as sandbox:
        for name, mb in (("a", 512), ("b", 1024)):
            write_defs(
                sandbox.defs_folder_path,
                name,
                f"""
                type: memsafe_dagster.MergeComponent
                attributes:
                  asset_key: wh/{name}
                  source: {{inbox: {tmp_path / name}}}
                  target_path: {tmp_path / "t" / name}
                  key_columns: [id]
                  memory: {{max_process_memory_mb: {mb}}}
                """,
            )
        with pytest.raises(Exception) as info, sandbox.build_all_defs():
            pass
        chain, error = [], info.value
        while error is not None:
            chain.append(str(error))
            error = error.__cause__ or error.__context__
        assert "different resources with same key 'memory'" in "\n".join(chain)


def test_the_scaffolder_writes_yaml_that_loads_and_runs(tmp_path: Path) -> None:
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(
            component_cls=MergeComponent,
            defs_path="customers",
            scaffold_params={"asset_key": "warehouse/customers", "key_columns": ["customer_id"]},
        )
        written = yaml.safe_load((path / "defs.yaml").read_text())
        attributes = written["attributes"]
        assert attributes["source"] == {
            "inbox": "{{ context.project_root }}/data/inbox/warehouse_customers"
        }
        assert attributes["target_path"] == "{{ context.project_root }}/data/warehouse_customers"
        assert attributes["key_columns"] == ["customer_id"]
        assert attributes["memory"] == {"profile": "container"}
        with sandbox.load_component_and_build_defs(defs_path=path) as (component, defs):
            assert isinstance(component, MergeComponent)
            root = str(sandbox.project_root)
            assert component.source.inbox == f"{root}/data/inbox/warehouse_customers"
            assert [s.name for s in defs.sensors] == ["customers_inbox"]
            inbox = Path(component.source.inbox)
            drop(inbox, "x.parquet", range(3), "x", key="customer_id")
            [merge] = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
            with dg.instance_for_test() as instance:
                assert dg.materialize([merge], instance=instance, resources=defs.resources).success
            assert ds.dataset(component.target_path).count_rows() == 3
        upstream = sandbox.scaffold_component(
            component_cls=MergeComponent,
            defs_path="orders",
            scaffold_params={"source_asset": "raw/orders", "key_columns": ["order_id"]},
        )
        attributes = yaml.safe_load((upstream / "defs.yaml").read_text())["attributes"]
        assert attributes["source"] == {"asset": "raw/orders"} and "sensor" not in attributes


def test_the_package_top_is_the_registry_module() -> None:
    """dg lists a registry module's component classes by attribute: memsafe_dagster.X."""
    from dagster.components.core.package_entry import get_package_objects_in_module

    found = dict(get_package_objects_in_module(memsafe_dagster))
    assert found == {
        "MergeComponent": MergeComponent,
        "MemoryResourceComponent": MemoryResourceComponent,
    }
