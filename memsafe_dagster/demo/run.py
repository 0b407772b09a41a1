"""``memsafe demo``: materialize the demo graph headless and print a short report per asset.

Runs go into the demo's own persistent Dagster instance, ``<data dir>/dagster_home`` (never a
``$DAGSTER_HOME`` of yours), which ``memsafe demo --ui`` and ``make ui`` also use: the web UI
then shows their history, metadata plots and check results. Each day is one run of
``orders_job`` (orders_raw -> orders_clean -> warehouse_orders); then new CRM exports are
dropped into the inbox and ``customers_job`` merges them. Running it again regenerates the
same days: the warehouse reports updates, not inserts.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from memsafe_dagster.demo.settings import DemoSettings

DAGSTER_YAML = """\
# Written by `memsafe demo`: the demo's Dagster instance (runs, materializations, schedules).
telemetry:
  enabled: false
# A limit for every pool, so two merges into one target never run at once (each merge asset
# has a pool derived from its target path).
concurrency:
  pools:
    default_limit: 1
"""


def ensure_dagster_home(home: Path) -> Path:
    """Create ``home`` and, when it has none, a dagster.yaml giving every pool a limit of 1."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    return home


@dataclass
class AssetLine:
    """One materialization in the report."""

    asset: str
    partition: str | None
    metadata: dict[str, Any]
    checks: dict[str, bool] = field(default_factory=dict)


@dataclass
class DemoReport:
    runs: list[tuple[str, str, bool]] = field(default_factory=list)  # (job, run id, success)
    lines: list[AssetLine] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(ok for _, _, ok in self.runs) and all(
            passed for line in self.lines for passed in line.checks.values()
        )


def clear_data(settings: DemoSettings) -> None:
    """Remove what the demo wrote (only its own subdirectories, never the data dir itself)."""
    for path in (
        settings.io_dir,
        settings.warehouse_orders.parent,
        settings.customers_inbox.parent,
        settings.dagster_home,
    ):
        shutil.rmtree(path, ignore_errors=True)


def run_demo(
    settings: DemoSettings,
    *,
    days: int | None = None,
    fresh: bool = False,
    multiprocess: bool = False,
    out: IO[str] = sys.stdout,
) -> DemoReport:
    """Materialize ``days`` daily partitions of the orders job and one inbox batch of the
    customers job into the persistent instance; print the report to ``out``."""
    import dagster as dg

    from memsafe_dagster.demo import data
    from memsafe_dagster.memory import detect_memory_limits
    from memsafe_dagster.memory.sizes import MiB

    started = time.perf_counter()
    home = settings.dagster_home
    if fresh:
        clear_data(settings)
    ensure_dagster_home(home)
    limits = detect_memory_limits()
    partitions = settings.partition_keys(days)
    print(
        f"memsafe demo: {len(partitions)} day(s) x {settings.orders_per_day:,} orders "
        f"(+10 % status updates from day 2), {settings.customers:,} customers, chunks of "
        f"{settings.chunk_rows:,} rows; memory limit {limits.limit_bytes / MiB:,.0f} MB "
        f"({limits.source})",
        file=out,
    )
    print(f"  data: {settings.data_dir}   Dagster home: {home}", file=out)
    executor = "multiprocess" if multiprocess else "in_process"
    run_config = {
        "execution": {"config": {executor: {}}},
        # The report says what happened; the console shows only Dagster's warnings and errors.
        "loggers": {"console": {"config": {"log_level": "WARNING"}}},
    }
    report = DemoReport()
    module = "memsafe_dagster.demo.definitions"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        orders = dg.build_reconstructable_job(module, "orders_job_def")
        for key in partitions:
            result = dg.execute_job(
                orders, instance, run_config=run_config, tags={"dagster/partition": key}
            )
            _collect(instance, report, "orders_job", result.run_id, result.success)
        inbox = settings.customers_inbox
        version = data.next_export_version(inbox)
        dropped = [data.drop_customer_export(inbox, settings.customers, version)]
        if version == 0:  # a first export, and an update of it in the same batch
            dropped.append(data.drop_customer_export(inbox, settings.customers, 1))
        print(f"  dropped {', '.join(p.name for p in dropped)} into {inbox}", file=out)
        customers = dg.build_reconstructable_job(module, "customers_job_def")
        result = dg.execute_job(customers, instance, run_config=run_config)
        _collect(instance, report, "customers_job", result.run_id, result.success)
    report.duration_s = time.perf_counter() - started
    print_report(report, home, out)
    return report


def _collect(instance: Any, report: DemoReport, job: str, run_id: str, success: bool) -> None:
    import dagster as dg

    report.runs.append((job, run_id, success))
    by_key: dict[tuple[str, str | None], AssetLine] = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        event = entry.dagster_event
        materialization = event.event_specific_data.materialization
        line = AssetLine(
            asset=materialization.asset_key.to_user_string(),
            partition=materialization.partition,
            metadata={k: getattr(v, "value", v) for k, v in materialization.metadata.items()},
        )
        by_key[(line.asset, line.partition)] = line
        report.lines.append(line)
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = entry.dagster_event.event_specific_data
        line = by_key.get((evaluation.asset_key.to_user_string(), evaluation.partition))
        if line is None:
            line = next(
                (li for li in by_key.values() if li.asset == evaluation.asset_key.to_user_string()),
                None,
            )
        if line is not None:
            line.checks[evaluation.check_name] = evaluation.passed


def _int(meta: dict[str, Any], key: str) -> str:
    value = meta.get(key)
    return f"{int(value):,}" if value is not None else ""


def print_report(report: DemoReport, home: Path, out: IO[str]) -> None:
    """One line per materialization: rows, peak RSS, limit and source, pressure, merge counts."""
    header = (
        f"{'asset':<20} {'partition':<10} {'rows':>9} {'peak RSS':>9} {'limit (source)':>21} "
        f"{'pressure':<8} {'inserted':>8} {'updated':>8} {'deleted':>7}  checks"
    )
    print("", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    for line in report.lines:
        meta = line.metadata
        limit = (
            f"{meta['memsafe/limit_mb']:,.0f} MB ({meta.get('memsafe/limit_source', '?')})"
            if "memsafe/limit_mb" in meta
            else ""
        )
        peak = f"{meta['memsafe/peak_rss_mb']:,.0f} MB" if "memsafe/peak_rss_mb" in meta else ""
        checks = ", ".join(
            f"{name} {'ok' if passed else 'FAILED'}" for name, passed in line.checks.items()
        )
        print(
            f"{line.asset:<20} {line.partition or '-':<10} {_int(meta, 'dagster/row_count'):>9} "
            f"{peak:>9} {limit:>21} {meta.get('memsafe/pressure', ''):<8} "
            f"{_int(meta, 'memsafe/inserted'):>8} {_int(meta, 'memsafe/updated'):>8} "
            f"{_int(meta, 'memsafe/deleted'):>7}  {checks}".rstrip(),
            file=out,
        )
    print("", file=out)
    failed = [(job, run_id) for job, run_id, ok in report.runs if not ok]
    verdict = "all succeeded" if not failed else f"{len(failed)} FAILED"
    print(
        f"{len(report.runs)} runs in {report.duration_s:.1f} s, {verdict}. Warehouse rows are the "
        "target's after the merge. `memsafe demo --ui` shows the runs, metadata plots and "
        f"checks in the web UI (DAGSTER_HOME={home}).",
        file=out,
    )
    for job, run_id in failed:
        print(f"  failed: {job} run {run_id}", file=out)
