"""Run the upsert contenders and the micro-benchmarks; write JSON and Markdown results.

``python -m benchmarks.run --suite quick|full [--only a,b] [--scenarios x,y] [--repeat N]
[--data-dir D] [--output NAME]``

Every run is its own child process (``run_measured``, or ``run_capped`` under a real cgroup
memory cap): wall time is the contender's own timing of the merge (median over the runs), peak
RSS comes from the OS (the kernel's high-water mark, VmHWM, of the child and its descendants),
and every output is verified. A run that crashes is
reported as "error" with its last stderr line, one the kernel kills as "OOM-killed", one that
exceeds its time bound as "timed out"; after a failed run a contender is not repeated in that
scenario. Results go to ``benchmarks/results/<suite>.json`` and ``.md``. Contenders on S3 get
a loopback moto server (``benchmarks.s3 --serve``) in a process of its own, started only when
one of them is selected.

The runner itself stays small: data generation and verification run in a helper process, so
the machine's memory is the contenders' (the runner's own peak is recorded as
``runner_peak_rss_mb``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.contenders._common import PHASE_MARKER, RESULT_MARKER, OutputFormat
from benchmarks.datagen import DEFAULT_DATA_DIR, DatasetSpec, GeneratedData, ensure_dataset
from benchmarks.s3 import AWS_ENV, ENDPOINT_ENV, ENDPOINT_MARKER
from benchmarks.scenarios_bytes import bytes_scenarios
from memsafe_dagster.memory import psutil
from memsafe_dagster.memory.cgroup_cap import CappedRun, MemoryCap, run_capped, run_measured

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CAP = "512m"
MB = 1024 * 1024

COMPLETED, OOM, TIMED_OUT, ERROR, SKIPPED = (
    "completed",
    "OOM-killed",
    "timed out",
    "error",
    "skipped",
)


# -- what runs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """An upsert implementation, run as ``python -m benchmarks.contenders.<name>``."""

    name: str
    output_format: OutputFormat = "parquet"
    merges: bool = True  # False for the floor, whose output is a copy of the target
    bounded: bool = False  # known to be very slow: run under the suite's short time bound
    scenarios: tuple[str, ...] | None = None  # the scenario keys it runs in (None: all)
    s3: bool = False  # reads and writes the loopback S3 server (``benchmarks.s3 --serve``)
    module: str | None = None  # benchmarks.contenders.<module> (default: the name)
    args: tuple[str, ...] = ()  # extra command-line arguments

    def runs_in(self, scenario: Scenario) -> bool:
        return self.scenarios is None or scenario.key in self.scenarios


_S3_SCENARIOS = ("1m", "1m-cap", "10m", "10m-cap")
CONTENDERS = (
    Contender("memsafe"),
    # The same upsert into a target on a loopback S3 server: the 10M/1M scenarios of the full
    # suite, the 1M/100k ones of the quick suite, each also under the 512 MB cap.
    Contender("memsafe_s3", scenarios=_S3_SCENARIOS, s3=True),
    # ... with s3fs's own 50 MB file buffers and read-ahead blocks instead of memsafe's 8 MiB.
    Contender(
        "memsafe_s3_50mb_blocks",
        scenarios=_S3_SCENARIOS,
        s3=True,
        module="memsafe_s3",
        args=("--block-size-mb", "50"),
    ),
    Contender("duckdb_512"),
    Contender("duckdb"),
    Contender("delta", output_format="delta"),
    Contender("polars"),
    Contender("naive_pyarrow"),
    Contender("fsspeckit", bounded=True),
    Contender("floor", merges=False),
    Contender("iceberg_memsafe", output_format="iceberg"),
    Contender("iceberg_pyiceberg", output_format="iceberg"),
)


@dataclass(frozen=True)
class Scenario:
    """A dataset, optionally merged under a real cgroup memory cap; ``key`` names it on the
    command line, ``name`` in the tables."""

    key: str
    name: str
    spec: DatasetSpec
    cap: str | None = None


@dataclass(frozen=True)
class Suite:
    """The scenarios and bounds of one benchmark suite."""

    name: str
    scenarios: tuple[Scenario, ...]
    repeat: int
    capped_repeat: int
    timeout_s: float
    bounded_timeout_s: float
    micro_spec: DatasetSpec
    micro_repeat: int
    sampler_s: float


_1M = DatasetSpec("random", 1_000_000, 10, 100_000)
_10M = DatasetSpec("random", 10_000_000, 10, 1_000_000)
_10M_CLUSTERED = DatasetSpec("clustered", 10_000_000, 20, 100_000)

SUITES = {
    "quick": Suite(
        name="quick",
        scenarios=(
            Scenario("1m", "1M/100k random", _1M),
            Scenario("1m-cap", "1M/100k random, 512 MB cap", _1M, cap=CAP),
        ),
        repeat=3,
        capped_repeat=1,
        timeout_s=120,
        bounded_timeout_s=10,
        micro_spec=_1M,
        micro_repeat=3,
        sampler_s=2,
    ),
    "full": Suite(
        name="full",
        scenarios=(
            Scenario("1m", "1M/100k random", _1M),
            Scenario("10m", "10M/1M random", _10M),
            Scenario("10m-clustered", "10M/100k clustered (1 of 20 files)", _10M_CLUSTERED),
            Scenario("10m-cap", "10M/1M random, 512 MB cap", _10M, cap=CAP),
        ),
        repeat=3,
        capped_repeat=3,
        timeout_s=600,
        bounded_timeout_s=180,
        micro_spec=_10M,
        micro_repeat=3,
        sampler_s=10,
    ),
}

# Issue 14's scenarios (files from other tools, wide rows, small and large merges).
for _suite in SUITES.values():
    _suite_scenarios = _suite.scenarios + bytes_scenarios(Scenario, _suite.name)
    SUITES[_suite.name] = replace(_suite, scenarios=_suite_scenarios)

MICRO = "micro"


# -- one run ------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One child process: its verdict, timings, peak memory and verification."""

    status: str
    merge_s: float | None
    process_s: float
    peak_rss_mb: float
    cgroup_peak_mb: float | None
    returncode: int
    error: str | None = None
    verified: bool | None = None
    verify_detail: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _result_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    return None


def _phase(stdout: str) -> str:
    """`` during <phase>`` for the last phase a contender announced, else nothing."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(PHASE_MARKER):
            return f" during {line[len(PHASE_MARKER) :].strip()}"
    return ""


def _verify_in_helper(
    out: Path, output_format: OutputFormat, data: GeneratedData, merged: bool
) -> tuple[bool, str]:
    """Run in the helper process: it imports ``pyarrow.dataset`` (and pandas with it), which
    the runner must not, and returns plain values so the runner need not import them to
    unpickle the verdict."""
    from benchmarks.verify import verify

    verdict = verify(out, output_format, data, merged=merged)
    return verdict.ok, verdict.detail


def _execute(argv: list[str], cap: str | None, timeout_s: float) -> CappedRun:
    if cap is not None:
        return run_capped(argv, cap, timeout_s=timeout_s, cwd=REPO_ROOT)
    return run_measured(argv, timeout_s=timeout_s, cwd=REPO_ROOT)


def _judge(run: CappedRun, timeout_s: float) -> tuple[str, dict[str, Any] | None, str | None]:
    """Status, parsed report and error text of a finished child."""
    phase = _phase(run.stdout)
    if run.timed_out:
        return TIMED_OUT, None, f"did not finish in {timeout_s:g} s{phase}"
    if run.oom_killed:
        return OOM, None, f"killed by the kernel's OOM killer{phase}"
    report = _result_line(run.stdout) if run.returncode == 0 else None
    if report is None:
        message = _last_line(run.stderr) or f"exit code {run.returncode}, no result line"
        return ERROR, None, message + phase
    return COMPLETED, report, None


def run_contender_once(
    contender: Contender,
    scenario: Scenario,
    data: GeneratedData,
    out: Path,
    timeout_s: float,
    helper: Executor,
) -> RunRecord:
    """Run ``contender`` once on ``scenario`` in a child process; verify its output in
    ``helper``."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        sys.executable,
        "-m",
        f"benchmarks.contenders.{contender.module or contender.name}",
        "--target",
        str(data.target),
        "--source",
        str(data.source),
        "--out",
        str(out),
        *contender.args,
    ]
    run = _execute(argv, scenario.cap, timeout_s)
    status, report, error = _judge(run, timeout_s)
    record = RunRecord(
        status=status,
        merge_s=report["merge_s"] if report else None,
        process_s=round(run.wall_s, 3),
        peak_rss_mb=round(run.peak_rss_bytes / MB, 1),
        cgroup_peak_mb=None
        if run.cgroup_peak_bytes is None
        else round(run.cgroup_peak_bytes / MB, 1),
        returncode=run.returncode,
        error=error,
        details=report["details"] if report else {},
    )
    if report is not None:
        record.verified, record.verify_detail = helper.submit(
            _verify_in_helper, out, contender.output_format, data, contender.merges
        ).result()
    shutil.rmtree(out, ignore_errors=True)
    return record


@contextlib.contextmanager
def s3_server(log: Callable[[str], None]) -> Iterator[str]:
    """A loopback S3 server in a process of its own; its endpoint and the fake credentials are
    in this process's environment (which the contenders inherit) while it runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.s3", "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # one access-log line per request
        cwd=REPO_ROOT,
        text=True,
    )
    saved = {k: os.environ.get(k) for k in (*AWS_ENV, ENDPOINT_ENV)}
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(ENDPOINT_MARKER):
            raise RuntimeError(f"the S3 server did not start (printed {line!r})")
        endpoint = line[len(ENDPOINT_MARKER) :].strip()
        os.environ.update({**AWS_ENV, ENDPOINT_ENV: endpoint})
        log(f"[s3] loopback S3 server (moto) at {endpoint}, pid {proc.pid}")
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- aggregation --------------------------------------------------------------------------------


@dataclass
class ContenderResult:
    """A contender's runs in one scenario, summarised."""

    contender: str
    scenario: str
    cap: str | None
    runs: list[RunRecord]
    skipped_reason: str | None = None

    @property
    def status(self) -> str:
        if self.skipped_reason is not None:
            return SKIPPED
        failed = [r for r in self.runs if r.status != COMPLETED]
        return failed[0].status if failed else COMPLETED

    @property
    def completed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == COMPLETED]

    def median(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.completed]
        return round(statistics.median(values), 3) if values else None

    @property
    def peak_rss_mb(self) -> float | None:
        """The largest peak RSS of any run, completed or not."""
        return max((r.peak_rss_mb for r in self.runs), default=None)

    @property
    def verified(self) -> str:
        done = self.completed
        if not done:
            return "-"
        bad = [r for r in done if not r.verified]
        return "yes" if not bad else f"NO: {bad[0].verify_detail}"

    @property
    def status_text(self) -> str:
        if self.skipped_reason is not None:
            return f"skipped: {self.skipped_reason}"
        failed = [r for r in self.runs if r.status != COMPLETED]
        if not failed:
            return COMPLETED
        first = failed[0]
        prefix = f"{first.status} in run {self.runs.index(first) + 1}"
        return f"{prefix}: {first.error}" if first.error else prefix

    def to_dict(self) -> dict[str, Any]:
        return {
            "contender": self.contender,
            "scenario": self.scenario,
            "cap": self.cap,
            "status": self.status,
            "status_text": self.status_text,
            "median_merge_s": self.median("merge_s"),
            "median_process_s": self.median("process_s"),
            "peak_rss_mb": self.peak_rss_mb,
            "verified": self.verified,
            "runs": [asdict(r) for r in self.runs],
        }


# -- micro-benchmarks ---------------------------------------------------------------------------


@dataclass
class MicroResult:
    """One micro-benchmark variant, run in its own child process."""

    section: str
    variant: str
    status: str
    peak_rss_mb: float
    figures: dict[str, Any]
    error: str | None = None


def run_micro(
    suite: Suite, data: GeneratedData, repeat: int, log: Callable[[str], None]
) -> list[MicroResult]:
    """Scan and write throughput against raw PyArrow, and the MemoryMonitor's costs."""
    variants = [
        ("scan", "scan-raw", ["--data", str(data.target)]),
        ("scan", "scan-memsafe", ["--data", str(data.target)]),
        ("scan", "scan-paired", ["--data", str(data.target), "--repeat", str(max(9, repeat))]),
        ("write", "write-raw", ["--data", str(data.target)]),
        ("write", "write-memsafe", ["--data", str(data.target)]),
        ("monitor", "pressure", ["--calls", "1000"]),
        ("monitor", "sampler", ["--seconds", str(suite.sampler_s), "--interval", "0.1"]),
    ]
    results = []
    for section, variant, extra in variants:
        argv = [sys.executable, "-m", "benchmarks.micro", variant, "--repeat", str(repeat), *extra]
        # A later --repeat in ``extra`` wins (argparse keeps the last).
        run = run_measured(argv, timeout_s=suite.timeout_s, cwd=REPO_ROOT)
        status, report, error = _judge(run, suite.timeout_s)
        result = MicroResult(
            section, variant, status, round(run.peak_rss_bytes / MB, 1), report or {}, error
        )
        log(f"[micro] {variant}: {status} {_micro_summary(result)}")
        results.append(result)
    return results


def _micro_summary(result: MicroResult) -> str:
    f = result.figures
    if result.status != COMPLETED:
        return result.error or ""
    if "rows_per_s" in f:
        return f"{f['rows_per_s'] / 1e6:.2f} M rows/s, peak {result.peak_rss_mb:.0f} MB"
    if "paired_ratio" in f:
        return f"memsafe at {100 * f['paired_ratio']:.0f} % of raw rows/s ({f['rounds']} rounds)"
    if "us_per_call" in f:
        return f"{f['us_per_call']:.1f} us/call"
    return f"{f['cpu_pct_of_core']:.2f} % of a core, {f['samples']} samples"


# -- reports ------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    versions = {}
    for dist in (
        "memsafe-dagster",
        "pyarrow",
        "duckdb",
        "deltalake",
        "polars",
        "fsspeckit",
        "pyiceberg",
        "s3fs",
        "moto",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1) if psutil else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cgroup_cap": MemoryCap.unavailable_reason() or "available",
        "versions": versions,
    }


def render_markdown(report: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    m, load = report["machine"], report["load_average_1m"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        f"# Benchmark results: `{report['suite']}` suite",
        "",
        f"Run {report['started']} in {report['duration_s']:.0f} s on {m['cpus']} CPUs, "
        f"{m['memory_gb']} GB RAM, {m['platform']}, Python {m['python']}; "
        f"cgroup caps: {m['cgroup_cap']}.",
        f"Versions: {versions}.",
        f"1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} at the end "
        "(a load above the CPU count means other processes competed with the runs).",
        "",
        "Wall time is each contender's own timing of the upsert (reading the source, merging, "
        "writing; not the untimed copy of the target or the Delta conversion), median of the "
        "completed runs. Process wall adds interpreter start, imports and that copy. Peak RSS is "
        "the largest of the runs, from the OS: the kernel's high-water mark (VmHWM) of the "
        "contender's process and its children, read every 5 ms (a high-water mark keeps a peak "
        "from the moment it happens). Capped runs execute inside a "
        "real cgroup memory limit; RSS also counts shared-library pages charged elsewhere, so "
        "an OOM-killed run can show more than the cap. The cgroup's own peak (page cache "
        "included) is in the JSON.",
        "",
    ]
    lines += [f"- {note}" for note in report["notes"]]
    lines += [
        "",
        "## Upsert",
        "",
        "| contender | scenario | median wall s | median process s | peak RSS MB | runs ok "
        "| status | verified |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in report["merge"]:
        lines.append(
            f"| {r['contender']} | {r['scenario']} | {_fmt(r['median_merge_s'])} "
            f"| {_fmt(r['median_process_s'])} | {_fmt(r['peak_rss_mb'], 0)} | {_runs(r['runs'])} "
            f"| {r['status_text'].replace('|', '/')} | {r['verified'].replace('|', '/')} |"
        )
    if report["micro"]:
        lines += _micro_markdown(report)
    return "\n".join(lines) + "\n"


def _runs(runs: list[dict[str, Any]]) -> str:
    """``completed/attempted``."""
    return f"{sum(r['status'] == COMPLETED for r in runs)}/{len(runs)}"


def _micro_markdown(report: dict[str, Any]) -> list[str]:
    by_variant = {r["variant"]: r for r in report["micro"]}
    spec = report["micro_dataset"]
    lines = [
        "",
        "## Streaming micro-benchmarks",
        "",
        f"On the {spec['target_rows']:,}-row target ({spec['target_files']} files); scans count "
        "rows in chunks of 100,000; writes put the same in-memory batches into one zstd file. "
        "Median of the runs; peak RSS of the whole child process (for writes it includes the "
        "table held in memory). Separate processes give each variant its own peak RSS; the "
        "alternated row compares throughput under the same conditions (median of the per-round "
        "ratios), which separate processes on a noisy machine do not.",
        "",
        "| benchmark | variant | median s | M rows/s | vs raw | peak RSS MB | status |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for section, label in (("scan", "scan"), ("write", "write")):
        raw = by_variant.get(f"{section}-raw")
        raw_rate = raw["figures"].get("rows_per_s") if raw else None
        for variant, name in (
            (f"{section}-raw", "raw PyArrow"),
            (f"{section}-memsafe", "memsafe"),
        ):
            r = by_variant.get(variant)
            if r is None:
                continue
            rate = r["figures"].get("rows_per_s")
            ratio = f"{100 * rate / raw_rate:.0f} %" if rate and raw_rate else "-"
            status = r["status"] if r["error"] is None else f"{r['status']}: {r['error']}"
            lines.append(
                f"| {label} | {name} | {_fmt(r['figures'].get('median_s'), 3)} "
                f"| {_fmt(rate / 1e6 if rate else None)} | {ratio} "
                f"| {_fmt(r['peak_rss_mb'], 0)} | {status.replace('|', '/')} |"
            )
        paired = by_variant.get(f"{section}-paired")
        if paired is not None and paired["status"] == COMPLETED:
            f = paired["figures"]
            rows = f["rows"]
            lines.append(
                f"| {label} | memsafe vs raw, alternated in one process ({f['rounds']} rounds) "
                f"| {f['memsafe_median_s']:.3f} | {rows / f['memsafe_median_s'] / 1e6:.2f} "
                f"| {100 * f['paired_ratio']:.0f} % | - | completed |"
            )
    pressure, sampler = by_variant.get("pressure"), by_variant.get("sampler")
    lines += ["", "| MemoryMonitor cost | value |", "|---|---|"]
    if pressure is not None:
        value = (
            f"{pressure['figures']['us_per_call']:.1f} µs per call"
            if pressure["status"] == COMPLETED
            else f"{pressure['status']}: {pressure['error']}"
        )
        lines.append(f"| `check_memory_pressure()` | {value} |")
    if sampler is not None:
        f = sampler["figures"]
        value = (
            f"{f['cpu_pct_of_core']:.2f} % of one core ({f['samples']} samples in "
            f"{f['wall_s']:.1f} s, {f['us_cpu_per_sample']:.0f} µs CPU each)"
            if sampler["status"] == COMPLETED
            else f"{sampler['status']}: {sampler['error']}"
        )
        lines.append(f"| `start_sampling(0.1)` background CPU | {value} |")
    return lines


# -- main ---------------------------------------------------------------------------------------


def _selected(names: str | None, known: list[str], what: str) -> list[str] | None:
    if names is None:
        return None
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return chosen


def _notes(suite: Suite, contenders: list[Contender], repeat: int | None) -> list[str]:
    """How the suite was run, in words."""
    runs = repeat or suite.repeat
    capped = repeat or suite.capped_repeat
    notes = [
        f"{runs} runs per contender and scenario ({capped} under the cap); a contender is not "
        "repeated in a scenario after a failed run.",
        f"Every run is bounded at {suite.timeout_s:g} s.",
    ]
    notes += [
        f"{c.name} is known to be very slow and is bounded at {suite.bounded_timeout_s:g} s."
        for c in contenders
        if c.bounded
    ]
    keys = {s.key for s in suite.scenarios}
    notes += [
        f"{c.name} runs the memsafe upsert into a target in a bucket of a loopback S3 server "
        "(moto's ThreadedMotoServer on 127.0.0.1, in a process of its own outside any cap; the "
        "source stays on local disk); the untimed upload before and download after the merge "
        "stream file by file and count in its peak RSS"
        + (f"; arguments {' '.join(c.args)}" if c.args else "")
        + ". It runs only in: "
        + ", ".join(s.name for s in suite.scenarios if s.key in (c.scenarios or keys))
        + "."
        for c in contenders
        if c.s3 and any(k in keys for k in (c.scenarios or keys))
    ]
    return notes


def _run_scenario(
    suite: Suite,
    scenario: Scenario,
    contenders: list[Contender],
    data_dir: Path,
    work: Path,
    repeat: int | None,
    cap_problem: str | None,
    helper: Executor,
    log: Callable[[str], None],
) -> list[ContenderResult]:
    """Every contender's runs in one scenario."""
    log(f"[{scenario.name}] preparing data {scenario.spec.name}")
    data = helper.submit(ensure_dataset, scenario.spec, data_dir).result()
    runs = repeat or (suite.capped_repeat if scenario.cap else suite.repeat)
    results = []
    for contender in contenders:
        result = ContenderResult(contender.name, scenario.name, scenario.cap, [])
        results.append(result)
        if scenario.cap is not None and cap_problem is not None:
            result.skipped_reason = f"no cgroup cap: {cap_problem}"
            continue
        timeout = suite.bounded_timeout_s if contender.bounded else suite.timeout_s
        for i in range(runs):
            out = work / f"{scenario.spec.name}-{contender.name}-{i}"
            record = run_contender_once(contender, scenario, data, out, timeout, helper)
            result.runs.append(record)
            log(
                f"[{scenario.name}] {contender.name} run {i + 1}/{runs}: {record.status} "
                f"merge {_fmt(record.merge_s)} s, process {record.process_s:.2f} s, "
                f"peak RSS {record.peak_rss_mb:.0f} MB"
                + (f", verified: {record.verify_detail}" if record.verify_detail else "")
                + (f" ({record.error})" if record.error else "")
            )
            if record.status != COMPLETED:
                break
    return results


def run_suite(
    suite: Suite,
    data_dir: Path,
    only: list[str] | None,
    repeat: int | None,
    helper: Executor,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every selected scenario, contender and micro-benchmark; return the report.

    ``helper`` generates data and verifies outputs, keeping the runner's own RSS small.
    """
    started_wall, started = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.perf_counter()
    load_start = os.getloadavg()[0]
    work = data_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    cap_problem = MemoryCap.unavailable_reason()
    contenders = [c for c in CONTENDERS if only is None or c.name in only]
    merge_results = []
    needs_s3 = any(c.s3 and c.runs_in(s) for c in contenders for s in suite.scenarios)
    with s3_server(log) if needs_s3 else contextlib.nullcontext():
        for scenario in suite.scenarios:
            present = [c for c in contenders if c.runs_in(scenario)]
            if present:
                merge_results += _run_scenario(
                    suite, scenario, present, data_dir, work, repeat, cap_problem, helper, log
                )
    micro: list[MicroResult] = []
    if only is None or MICRO in only:
        data = helper.submit(ensure_dataset, suite.micro_spec, data_dir).result()
        micro = run_micro(suite, data, repeat or suite.micro_repeat, log)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "suite": suite.name,
        "started": started_wall,
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": machine_info(),
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "notes": _notes(suite, contenders, repeat),
        "scenarios": [
            {"key": s.key, "name": s.name, "cap": s.cap, "dataset": asdict(s.spec)}
            for s in suite.scenarios
        ],
        "merge": [r.to_dict() for r in merge_results],
        "micro_dataset": asdict(suite.micro_spec),
        "micro": [asdict(r) for r in micro],
        "runner_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the suite, write the results."""
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--only", help="comma-separated contenders and/or 'micro'")
    parser.add_argument("--scenarios", help="comma-separated scenario keys of the suite")
    parser.add_argument("--repeat", type=int, help="runs per contender and scenario")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--output", help="results file name (default: the suite name)")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")

    suite = SUITES[args.suite]
    only = _selected(args.only, [c.name for c in CONTENDERS] + [MICRO], "contenders")
    keys = _selected(args.scenarios, [s.key for s in suite.scenarios], "scenarios")
    if keys is not None:
        suite = replace(suite, scenarios=tuple(s for s in suite.scenarios if s.key in keys))
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as helper:
        report = run_suite(suite, args.data_dir.resolve(), only, args.repeat, helper)

    RESULTS_DIR.mkdir(exist_ok=True)
    name = args.output or suite.name
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(render_markdown(report))
    print(f"wrote {RESULTS_DIR / name}.json and .md in {report['duration_s']:.0f} s")


if __name__ == "__main__":
    main()
