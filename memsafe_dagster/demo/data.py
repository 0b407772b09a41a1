"""The demo's data: daily orders generated chunk by chunk, and CRM customer exports.

New orders of a day get ids ``first_id + d * orders_per_day + i`` (``d`` the day's index from
the first demo day; ``first_id`` makes a date's ids the same whichever day the demo starts
on). From the second day on, a tenth as many rows again are status changes of earlier orders
(same ``order_id``, a later status and ``updated_at``), so the warehouse upsert reports
updates as well as inserts; about one new order in a hundred is dirty (no customer, or a
non-positive amount) for the cleaning step to drop. Everything is seeded by the day, so a
partition always regenerates the same rows.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

STATUSES = ("placed", "paid", "shipped", "delivered", "returned")
CURRENCIES = ("eur", "EUR", "usd", "USD", "gbp")
EUR_PER = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17}
COUNTRIES = ("DE", "FR", "NL", "US", "GB", "ES", "IT", "PL")
SEGMENTS = ("consumer", "smb", "enterprise")

TS = pa.timestamp("ms", tz="UTC")
ORDER_SCHEMA = pa.schema(
    [
        pa.field("order_id", pa.int64(), nullable=False),
        pa.field("customer_id", pa.int64()),
        pa.field("order_ts", TS),
        pa.field("status", pa.string()),
        pa.field("currency", pa.string()),
        pa.field("amount", pa.float64()),
        pa.field("quantity", pa.int32()),
        pa.field("updated_at", TS),
    ]
)
CLEAN_SCHEMA = pa.schema(
    [
        pa.field("order_id", pa.int64(), nullable=False),
        pa.field("customer_id", pa.int64()),
        pa.field("order_ts", TS),
        pa.field("order_date", pa.date32()),
        pa.field("status", pa.string()),
        pa.field("currency", pa.string()),
        pa.field("amount", pa.float64()),
        pa.field("amount_eur", pa.float64()),
        pa.field("quantity", pa.int32()),
        pa.field("updated_at", TS),
    ]
)
CUSTOMER_SCHEMA = pa.schema(
    [
        pa.field("customer_id", pa.int64(), nullable=False),
        pa.field("name", pa.string()),
        pa.field("email", pa.string()),
        pa.field("country", pa.string()),
        pa.field("segment", pa.string()),
        pa.field("updated_at", TS),
    ]
)

UPDATE_SHARE = 0.1
DIRTY_SHARE = 0.01


def _rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


def _midnight_ms(day: str) -> int:
    start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.timezone.utc)
    return int(start.timestamp() * 1000)


def order_batches(
    day: str,
    day_index: int,
    orders_per_day: int,
    chunk_rows: int,
    customers: int,
    first_id: int = 0,
) -> Iterator[pa.RecordBatch]:
    """The rows of ``day`` in record batches of ``chunk_rows`` rows, generated lazily:
    ``orders_per_day`` new orders, then (from the second day on) status changes of a tenth as
    many earlier orders."""
    rng = _rng("orders", day)
    earlier = day_index * orders_per_day
    updates = min(int(orders_per_day * UPDATE_SHARE), earlier)
    updated_ids = np.sort(rng.choice(earlier, size=updates, replace=False)) if updates else None
    total = orders_per_day + updates
    midnight = _midnight_ms(day)
    for start in range(0, total, chunk_rows):
        n = min(chunk_rows, total - start)
        positions = np.arange(start, start + n)
        is_update = positions >= orders_per_day
        ids = earlier + positions
        order_ts = midnight + rng.integers(0, 86_400_000, n)
        if updated_ids is not None and is_update.any():
            ids = np.where(is_update, updated_ids[np.maximum(positions - orders_per_day, 0)], ids)
            # An update's order was placed on the day its id was created.
            placed_day = np.minimum(ids // orders_per_day, day_index)
            order_ts = np.where(
                is_update, order_ts - 86_400_000 * (day_index - placed_day), order_ts
            )
        ids = ids + first_id
        status = np.where(is_update, rng.integers(2, 5, n), rng.integers(0, 2, n))
        amount = np.round(rng.gamma(2.0, 40.0, n), 2)
        dirty = (rng.random(n) < DIRTY_SHARE) & ~is_update
        no_customer = dirty & (rng.random(n) < 0.5)
        amount = np.where(dirty & ~no_customer, -amount, amount)
        yield pa.record_batch(
            [
                pa.array(ids.astype(np.int64)),
                pa.array(rng.integers(0, customers, n).astype(np.int64), mask=no_customer),
                pa.array(order_ts, TS),
                pa.array(np.array(STATUSES, dtype=object)[status]),
                pa.array(np.array(CURRENCIES, dtype=object)[rng.integers(0, len(CURRENCIES), n)]),
                pa.array(amount),
                pa.array(rng.integers(1, 6, n).astype(np.int32)),
                pa.array(np.full(n, midnight + 86_400_000 - 1), TS),
            ],
            schema=ORDER_SCHEMA,
        )


def clean_orders(table: pa.Table) -> pa.Table:
    """Drop dirty rows, normalize the currency, add ``amount_eur`` and ``order_date``."""
    keep = pc.and_(pc.is_valid(table["customer_id"]), pc.greater(table["amount"], 0))
    table = table.filter(keep)
    currency = pc.utf8_upper(table["currency"])
    rate = pc.case_when(
        pc.make_struct(*[pc.equal(currency, code) for code in EUR_PER]),
        *[pa.scalar(r) for r in EUR_PER.values()],
    )
    return pa.table(
        {
            "order_id": table["order_id"],
            "customer_id": table["customer_id"],
            "order_ts": table["order_ts"],
            "order_date": pc.cast(table["order_ts"], pa.date32()),
            "status": table["status"],
            "currency": currency,
            "amount": table["amount"],
            "amount_eur": pc.round(pc.multiply(table["amount"], rate), 2),
            "quantity": table["quantity"],
            "updated_at": table["updated_at"],
        },
        schema=CLEAN_SCHEMA,
    )


def customers_table(ids: np.ndarray, version: int) -> pa.Table:
    """CRM rows for ``ids``; ``version`` changes emails and segments like a later export."""
    rng = _rng("customers", version)
    n = len(ids)
    now = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    return pa.table(
        {
            "customer_id": pa.array(ids.astype(np.int64)),
            "name": pa.array([f"Customer {i}" for i in ids]),
            "email": pa.array([f"c{i}.v{version}@example.com" for i in ids]),
            "country": pa.array(np.array(COUNTRIES, dtype=object)[rng.integers(0, 8, n)]),
            "segment": pa.array(np.array(SEGMENTS, dtype=object)[rng.integers(0, 3, n)]),
            "updated_at": pa.array(np.full(n, now), TS),
        },
        schema=CUSTOMER_SCHEMA,
    )


def drop_customer_export(inbox: Path, customers: int, version: int) -> Path:
    """Write a CRM export into the inbox as a new Parquet file, as an external system would
    (written under a dot-name, then renamed, so the sensor never sees half a file).

    Version 0 is the full export of ``customers`` customers; later versions update a tenth of
    them and add a twentieth as new customers.
    """
    inbox.mkdir(parents=True, exist_ok=True)
    if version == 0:
        ids = np.arange(customers)
    else:
        rng = _rng("customer-updates", version)
        changed = rng.choice(customers, size=max(1, customers // 10), replace=False)
        added = (
            customers + (version - 1) * max(1, customers // 20) + np.arange(max(1, customers // 20))
        )
        ids = np.sort(np.concatenate([changed, added]))
    path = inbox / f"customers_{version:04d}.parquet"
    partial = inbox / f".{path.name}.partial"
    pq.write_table(customers_table(ids, version), partial)
    partial.rename(path)
    return path


def next_export_version(inbox: Path) -> int:
    """One more than the highest export version in the inbox or its ``_processed`` archive."""
    versions = [
        int(p.stem.split("_")[-1])
        for p in inbox.rglob("customers_*.parquet")
        if p.stem.split("_")[-1].isdigit()
    ]
    return max(versions, default=-1) + 1
