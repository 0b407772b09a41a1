"""Kubernetes pod sizes from measured peaks, as ``dagster-k8s/config`` tags.

dagster-k8s reads the ``dagster-k8s/config`` tag (JSON with ``container_config``,
``pod_spec_config``, ...) from a run's tags (``K8sRunLauncher``: the run's pod) and from an
op's or asset's ``op_tags`` (``k8s_job_executor``: each step's pod). These helpers build its
``container_config.resources`` from what ``memsafe/peak_rss_mb`` recorded, with a margin, and
merge them into existing tags without touching other keys. Sizes are written as Kubernetes
quantities in ``Mi``. ``parse_quantity_mb`` reads any memory quantity back.
"""

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from memsafe_dagster import metadata as md

K8S_CONFIG_TAG = "dagster-k8s/config"

_QUANTITY = re.compile(r"^\s*([0-9.]+(?:[eE][0-9]+)?)\s*([KMGTPE]i?|[kmMGTPE]|)\s*$")
_UNITS_MB = {
    "": 1 / 2**20,
    "k": 1000 / 2**20,
    "K": 1000 / 2**20,
    "M": 1e6 / 2**20,
    "G": 1e9 / 2**20,
    "T": 1e12 / 2**20,
    "P": 1e15 / 2**20,
    "E": 1e18 / 2**20,
    "Ki": 1 / 1024,
    "Mi": 1,
    "Gi": 1024,
    "Ti": 1024**2,
    "Pi": 1024**3,
    "Ei": 1024**4,
    "m": 1e-3 / 2**20,
}


def parse_quantity_mb(quantity: str | int | float) -> float:
    """A Kubernetes memory quantity ("512Mi", "1G", "1.5Gi", bytes) in MiB."""
    if isinstance(quantity, (int, float)):
        return float(quantity) / 2**20
    found = _QUANTITY.match(str(quantity))
    if not found:
        raise ValueError(f"not a Kubernetes memory quantity: {quantity!r}")
    return float(found.group(1)) * _UNITS_MB[found.group(2)]


def quantity(mb: float) -> str:
    """MiB as a Kubernetes quantity, rounded up to a whole Mi."""
    return f"{max(1, math.ceil(mb))}Mi"


def k8s_config(tags: Mapping[str, str] | None) -> dict[str, Any]:
    """The ``dagster-k8s/config`` JSON of ``tags`` ({} when absent)."""
    raw = (tags or {}).get(K8S_CONFIG_TAG)
    if not raw:
        return {}
    loaded = json.loads(raw)
    return loaded if isinstance(loaded, dict) else {}


def memory_limit_mb(tags: Mapping[str, str] | None) -> float | None:
    """The container memory limit the tags set, in MiB (None when they set none)."""
    limits = (
        k8s_config(tags).get("container_config", {}).get("resources", {}).get("limits", {}) or {}
    )
    value = limits.get("memory")
    return parse_quantity_mb(value) if value is not None else None


def with_memory(
    tags: Mapping[str, str] | None, *, request_mb: float | None, limit_mb: float | None
) -> dict[str, str]:
    """``tags`` with the container's memory request/limit set in ``dagster-k8s/config``; every
    other tag and every other part of the config are kept."""
    out = dict(tags or {})
    config = k8s_config(out)
    container = dict(config.get("container_config") or {})
    resources = dict(container.get("resources") or {})
    if request_mb is not None:
        resources["requests"] = {
            **(resources.get("requests") or {}),
            "memory": quantity(request_mb),
        }
    if limit_mb is not None:
        resources["limits"] = {**(resources.get("limits") or {}), "memory": quantity(limit_mb)}
    container["resources"] = resources
    config["container_config"] = container
    out[K8S_CONFIG_TAG] = json.dumps(config, sort_keys=True)
    return out


def memory_tags_for_peaks(
    peaks_mb: Sequence[float],
    *,
    margin: float = 0.25,
    percentile: float = 0.9,
    min_mb: float = 256.0,
    tags: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Tags whose request is the ``percentile`` of ``peaks_mb`` plus ``margin`` and whose limit
    is the largest peak plus ``margin`` (both at least ``min_mb``)."""
    values = sorted(float(p) for p in peaks_mb)
    if not values:
        raise ValueError("memory_tags_for_peaks needs at least one peak")
    index = min(len(values) - 1, round(percentile * (len(values) - 1)))
    request = max(min_mb, values[index] * (1 + margin))
    limit = max(request, min_mb, values[-1] * (1 + margin))
    return with_memory(tags, request_mb=request, limit_mb=limit)


def recorded_peaks_mb(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey | str | Sequence[str], *, limit: int = 20
) -> list[float]:
    """``memsafe/peak_rss_mb`` of the asset's last ``limit`` materializations."""
    key = dg.AssetKey.from_coercible(asset_key)
    records = instance.fetch_materializations(key, limit=limit).records
    peaks = []
    for record in records:
        materialization = record.asset_materialization
        value = materialization.metadata.get(md.PEAK_RSS_MB) if materialization else None
        if value is not None:
            peaks.append(float(value.value))
    return peaks


def k8s_tags_from_history(
    instance: dg.DagsterInstance,
    asset_key: dg.AssetKey | str | Sequence[str],
    *,
    margin: float = 0.25,
    percentile: float = 0.9,
    min_mb: float = 256.0,
    history: int = 20,
    tags: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """``dagster-k8s/config`` tags sized from the asset's recorded peaks (see
    ``memory_tags_for_peaks``); ``tags`` unchanged when nothing was recorded yet.

    Use the result as an asset's ``op_tags`` (``k8s_job_executor``: one pod per step), a job's
    ``tags`` or a ``RunRequest``'s ``tags`` (``K8sRunLauncher``: one pod per run; size it for
    the largest step when the run's steps share the pod).
    """
    peaks = recorded_peaks_mb(instance, asset_key, limit=history)
    if not peaks:
        return dict(tags or {})
    return memory_tags_for_peaks(
        peaks, margin=margin, percentile=percentile, min_mb=min_mb, tags=tags
    )
