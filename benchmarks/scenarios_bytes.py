"""Scenarios of issue 14: files written by other tools, wide rows, small and large merges.

Each runs uncapped and under the suite's 512 MB cgroup cap, side by side with the other
contenders:

- **pandas-default**: one 500k-row file of ~1 KB rows written by ``pq.write_table`` with its
  defaults (what ``pandas.to_parquet`` calls): a single row group of about 480 MB;
- **wide**: 1.5M rows x ~1 KB in three such files, a 150k-row source;
- **10M/10k**: the fixed costs of a small merge into a large target;
- **50M/1M**: a large target (full suite; the quick suite runs 2M/10k in place of both large
  ones).
"""

from __future__ import annotations

from benchmarks.datagen import DatasetSpec

CAP = "512m"
WIDE_ROW_BYTES = 960

PANDAS_DEFAULT = DatasetSpec(
    "random", 500_000, 1, 50_000, payload_bytes=WIDE_ROW_BYTES, row_group_rows=0
)
WIDE = DatasetSpec("random", 1_500_000, 3, 150_000, payload_bytes=WIDE_ROW_BYTES, row_group_rows=0)
SMALL_INTO_LARGE = DatasetSpec("random", 10_000_000, 10, 10_000)
LARGE = DatasetSpec("random", 50_000_000, 50, 1_000_000)
SMALL_INTO_MEDIUM = DatasetSpec("random", 2_000_000, 4, 10_000)


def _pair(scenario: type, key: str, name: str, spec: DatasetSpec) -> tuple:
    return (scenario(key, name, spec), scenario(f"{key}-cap", f"{name}, 512 MB cap", spec, cap=CAP))


def bytes_scenarios(scenario: type, suite: str) -> tuple:
    """The scenarios of ``suite`` ("quick" or "full"), built with the runner's ``Scenario``."""
    out = _pair(scenario, "pandas", "pandas-default 500k x 1KB, 1 row group / 50k", PANDAS_DEFAULT)
    out += _pair(scenario, "wide", "wide 1.5M x 1KB / 150k", WIDE)
    if suite == "quick":
        return out + _pair(scenario, "2m-10k", "2M/10k random", SMALL_INTO_MEDIUM)
    out += _pair(scenario, "10m-10k", "10M/10k random", SMALL_INTO_LARGE)
    return out + _pair(scenario, "50m-1m", "50M/1M random", LARGE)
