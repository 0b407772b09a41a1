"""dagster-k8s/config tags from measured peaks, validated by dagster-k8s's own parser."""

import json

import dagster as dg
import pytest
from dagster_k8s.job import UserDefinedDagsterK8sConfig, get_user_defined_k8s_config

from memsafe_dagster import MemoryMonitorResource
from memsafe_dagster.k8s import (
    K8S_CONFIG_TAG,
    k8s_tags_from_history,
    memory_limit_mb,
    memory_tags_for_peaks,
    parse_quantity_mb,
    with_memory,
)
from memsafe_dagster.memory.sizes import MiB


def _resources(tags: dict[str, str]) -> dict:
    parsed = get_user_defined_k8s_config(tags)
    assert isinstance(parsed, UserDefinedDagsterK8sConfig)
    return parsed.container_config["resources"]


@pytest.mark.parametrize(
    ("quantity", "mb"),
    [("512Mi", 512), ("1Gi", 1024), ("1.5Gi", 1536), ("1G", 1e9 / MiB), ("2048Ki", 2), (MiB, 1)],
)
def test_quantities(quantity, mb) -> None:
    assert parse_quantity_mb(quantity) == pytest.approx(mb)


def test_bad_quantity() -> None:
    with pytest.raises(ValueError, match="not a Kubernetes memory quantity"):
        parse_quantity_mb("lots")


def test_peaks_become_requests_and_limits_with_a_margin() -> None:
    tags = memory_tags_for_peaks([300, 310, 320, 330, 340, 350, 360, 370, 380, 400], margin=0.25)
    res = _resources(tags)
    assert res["requests"]["memory"] == "475Mi"  # p90 = 380 x 1.25
    assert res["limits"]["memory"] == "500Mi"  # max 400 x 1.25
    small = _resources(memory_tags_for_peaks([10.0]))
    assert small["requests"]["memory"] == small["limits"]["memory"] == "256Mi"  # the floor


def test_other_k8s_config_is_kept() -> None:
    base = {
        K8S_CONFIG_TAG: json.dumps(
            {
                "container_config": {"resources": {"requests": {"cpu": "500m"}}, "env": []},
                "pod_spec_config": {"node_selector": {"pool": "big"}},
            }
        ),
        "team": "data",
    }
    tags = with_memory(base, request_mb=1000, limit_mb=2000.2)
    parsed = get_user_defined_k8s_config(tags)
    assert parsed.pod_spec_config == {"node_selector": {"pool": "big"}}
    assert parsed.container_config["resources"] == {
        "requests": {"cpu": "500m", "memory": "1000Mi"},
        "limits": {"memory": "2001Mi"},
    }
    assert tags["team"] == "data"
    assert memory_limit_mb(tags) == 2001
    assert memory_limit_mb({"team": "data"}) is None


@dg.asset
def measured(context: dg.AssetExecutionContext, memory: MemoryMonitorResource) -> None:
    with memory.track(context):
        block = bytearray(40 * MiB)
        for i in range(0, len(block), 4096):
            block[i] = 1
        del block


def test_tags_from_an_assets_materialization_history() -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert k8s_tags_from_history(instance, "measured", tags={"a": "b"}) == {"a": "b"}
    for _ in range(3):
        assert dg.materialize(
            [measured], instance=instance, resources={"memory": MemoryMonitorResource()}
        ).success
    peaks = [
        r.asset_materialization.metadata["memsafe/peak_rss_mb"].value
        for r in instance.fetch_materializations(measured.key, limit=10).records
    ]
    tags = k8s_tags_from_history(instance, measured.key, margin=0.5)
    res = _resources(tags)
    assert parse_quantity_mb(res["limits"]["memory"]) == pytest.approx(max(peaks) * 1.5, abs=1)
    assert parse_quantity_mb(res["requests"]["memory"]) <= parse_quantity_mb(
        res["limits"]["memory"]
    )

    # Usable as op tags (k8s_job_executor), job tags and run request tags (the run launcher).
    @dg.asset(op_tags=tags)
    def sized() -> None: ...

    job = dg.define_asset_job("sized_job", selection=[sized], tags=tags)
    defs = dg.Definitions(assets=[sized], jobs=[job])
    resolved = defs.resolve_job_def("sized_job")
    assert _resources(resolved.tags) == res
    assert _resources(sized.op.tags) == res
    assert _resources(dg.RunRequest(tags=tags).tags) == res
