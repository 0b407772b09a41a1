"""The demo's sizes and places, from environment variables (defaults finish in seconds).

``MEMSAFE_DEMO_DATA``            data directory (default ``./.memsafe_data``, git-ignored)
``MEMSAFE_DEMO_ORDERS_PER_DAY``  orders generated per daily partition (default 100000)
``MEMSAFE_DEMO_DAYS``            days ``memsafe demo`` materializes (default 3)
``MEMSAFE_DEMO_CUSTOMERS``       customers in the CRM export dropped into the inbox (default 20000)
``MEMSAFE_DEMO_CHUNK_ROWS``      rows per chunk when generating, cleaning and merging (25000)
``MEMSAFE_DEMO_START_DATE``      first daily partition (default: ``MEMSAFE_DEMO_DAYS`` days ago, so
                                 the demo's days are exactly the partitions that exist)
``MEMSAFE_DEMO_SENSOR_INTERVAL`` seconds between inbox sensor ticks (default 15)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "MEMSAFE_DEMO_DATA"
DEFAULT_DATA_DIR = ".memsafe_data"

_INTS = {
    "orders_per_day": ("MEMSAFE_DEMO_ORDERS_PER_DAY", 100_000),
    "days": ("MEMSAFE_DEMO_DAYS", 3),
    "customers": ("MEMSAFE_DEMO_CUSTOMERS", 20_000),
    "chunk_rows": ("MEMSAFE_DEMO_CHUNK_ROWS", 25_000),
    "sensor_interval_s": ("MEMSAFE_DEMO_SENSOR_INTERVAL", 15),
}
START_ENV = "MEMSAFE_DEMO_START_DATE"
#: Day 0 of the order ids: a date's orders keep their ids whichever day the demo starts on.
ID_EPOCH = dt.date(2020, 1, 1)


def default_start(days: int, today: dt.date | None = None) -> str:
    """The first of the ``days`` complete days before ``today`` (UTC): the daily partitions
    that exist then are exactly the days ``memsafe demo`` runs."""
    today = today if today is not None else dt.datetime.now(dt.timezone.utc).date()
    return (today - dt.timedelta(days=days)).isoformat()


@dataclass(frozen=True)
class DemoSettings:
    """Where the demo keeps its data and how much it generates."""

    data_dir: Path
    orders_per_day: int = 100_000
    days: int = 3
    customers: int = 20_000
    chunk_rows: int = 25_000
    sensor_interval_s: int = 15
    start_date: str = dataclasses.field(default_factory=lambda: default_start(3))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DemoSettings:
        """Settings from ``env`` (default ``os.environ``); a bad value is a ValueError naming
        its variable."""
        env = os.environ if env is None else env
        data_dir = Path(env.get(DATA_ENV) or DEFAULT_DATA_DIR).expanduser().resolve()
        values: dict[str, int] = {}
        for field_name, (var, default) in _INTS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                values[field_name] = default
                continue
            try:
                value = int(raw.replace("_", ""))
            except ValueError:
                raise ValueError(f"{var} must be a positive integer, got {raw!r}") from None
            if value <= 0:
                raise ValueError(f"{var} must be a positive integer, got {raw!r}")
            values[field_name] = value
        start = env.get(START_ENV) or default_start(values["days"])
        try:
            dt.date.fromisoformat(start)
        except ValueError:
            raise ValueError(f"{START_ENV} must be a date like 2025-01-01, got {start!r}") from None
        return cls(data_dir=data_dir, start_date=start, **values)

    # -- places -------------------------------------------------------------------------------

    @property
    def io_dir(self) -> Path:
        """Where ChunkedParquetIOManager keeps the intermediate assets."""
        return self.data_dir / "assets"

    @property
    def warehouse_orders(self) -> Path:
        return self.data_dir / "warehouse" / "orders"

    @property
    def warehouse_customers(self) -> Path:
        return self.data_dir / "warehouse" / "customers"

    @property
    def customers_inbox(self) -> Path:
        return self.data_dir / "inbox" / "customers"

    @property
    def dagster_home(self) -> Path:
        return self.data_dir / "dagster_home"

    def partition_keys(self, days: int | None = None) -> list[str]:
        """The first ``days`` daily partition keys."""
        first = dt.date.fromisoformat(self.start_date)
        count = self.days if days is None else days
        return [(first + dt.timedelta(days=i)).isoformat() for i in range(count)]

    def day_index(self, partition_key: str) -> int:
        return (dt.date.fromisoformat(partition_key) - dt.date.fromisoformat(self.start_date)).days

    @property
    def first_order_id(self) -> int:
        """The first order id of the first demo day (ids count days from ``ID_EPOCH``)."""
        return (dt.date.fromisoformat(self.start_date) - ID_EPOCH).days * self.orders_per_day
