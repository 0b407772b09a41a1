"""Child processes of the bytes tests: wide-row data written the way pandas writes it, merges
and streams of it, and a row-by-row check of the result.

``python tests/bytes_helpers.py gen-wide DIR FILES ROWS_PER_FILE`` writes FILES files of one
ROWS_PER_FILE-row row group each (pyarrow's ``write_table`` defaults, as ``pandas.to_parquet``
uses them) of ~1 KB rows; ``gen-source DIR ROWS TARGET_ROWS`` a source whose first half updates
target ids and second half inserts new ones; ``merge SOURCE TARGET [json-kwargs]`` merges with
default settings and prints the result as JSON; ``stream PATH`` streams with default settings;
``verify TARGET TARGET_ROWS SOURCE_ROWS`` checks every row of the merged target.

Row contents are a function of the id (and of whether the source wrote it), so a check needs
no copy of the data: ``PAYLOAD_COLUMNS`` string columns of ``PAYLOAD_BYTES`` bytes each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PAYLOAD_COLUMNS = 8
PAYLOAD_BYTES = 120
WRITE_ROWS = 50_000


def _payload(ids, column: int, tag: str):
    import pyarrow as pa
    import pyarrow.compute as pc

    filler = (f"{tag}{column}" * PAYLOAD_BYTES)[: PAYLOAD_BYTES - 13]
    return pc.binary_join_element_wise(
        pc.utf8_lpad(pc.cast(ids, pa.string()), 12, "0"), pa.scalar(filler), "-"
    )


def wide_table(ids, tag: str = "t"):
    import pyarrow as pa

    arr = pa.array(ids, pa.int64())
    columns = {"id": arr}
    for c in range(PAYLOAD_COLUMNS):
        columns[f"p{c}"] = _payload(arr, c, tag)
    columns["v"] = pa.array(ids * 3 if tag == "t" else ids * 7, pa.int64())
    return pa.table(columns)


def gen_wide(directory: str, files: int, rows_per_file: int) -> None:
    """``files`` files written with ``pq.write_table``'s defaults (what ``pandas.to_parquet``
    calls): snappy, dictionaries, and a single row group up to 1Mi rows."""
    import numpy as np
    import pyarrow.parquet as pq

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        ids = np.arange(f * rows_per_file, (f + 1) * rows_per_file, dtype=np.int64)
        pq.write_table(wide_table(ids), out / f"part-{f:03d}.parquet")


def gen_narrow(directory: str, rows: int) -> None:
    """The seed loop's data: 500k-row files of 128k-row row groups, a ``status`` column."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    write_rows = 250_000
    status = pa.array(["active", "inactive", "pending", "closed"]).take(
        pa.array(np.arange(write_rows) % 4)
    )
    x = np.linspace(0, 1, write_rows)
    schema = pa.schema([("id", pa.int64()), ("x", pa.float64()), ("status", pa.string())])
    for f in range(rows // 500_000):
        with pq.ParquetWriter(out / f"part-{f:03d}.parquet", schema) as writer:
            for start in range(0, 500_000, write_rows):
                base = f * 500_000 + start
                ids = np.arange(base, base + write_rows, dtype=np.int64)
                table = pa.table({"id": ids, "x": x, "status": status}, schema=schema)
                writer.write_table(table, row_group_size=131_072)


def seed_loop(path: str, mode: str, cpu_cgroup: str) -> None:
    """The seed's loop: ``process_in_chunks(ds.dataset(path), chunk_size_rows=50_000)`` with a
    ``chunk.filter(...)`` per chunk (``mode="scanner"``: the same work over a dataset scanner
    with PyArrow's readahead bounded to 2 batches x 2 files, the control). The process enters
    ``cpu_cgroup`` first (a CPU quota) unless it is "-"."""
    import os
    import time

    if cpu_cgroup != "-":
        with open(os.path.join(cpu_cgroup, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from memsafe_dagster.datasets import process_in_chunks

    started = time.perf_counter()
    dataset = ds.dataset(path)
    if mode == "scanner":
        chunks = (
            pa.Table.from_batches([b])
            for b in dataset.to_batches(batch_size=50_000, batch_readahead=2, fragment_readahead=2)
        )
    else:
        chunks = process_in_chunks(dataset, chunk_size_rows=50_000)
    rows = kept = largest = 0
    for chunk in chunks:
        active = chunk.filter(pc.field("status") == "active")
        rows += chunk.num_rows
        kept += active.num_rows
        largest = max(largest, chunk.num_rows)
    with open("/proc/self/status") as status:
        hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    out = {"rows": rows, "kept": kept, "largest": largest, "vm_hwm_mb": hwm_kb / 1024}
    out["s"] = time.perf_counter() - started
    print(json.dumps(out))


def source_ids(rows: int, target_rows: int):
    """Half updates (every other target id, spread over all files), half new ids."""
    import numpy as np

    half = rows // 2
    step = max(1, target_rows // half)
    updates = np.arange(0, half * step, step, dtype=np.int64)[:half]
    inserts = np.arange(target_rows, target_rows + rows - half, dtype=np.int64)
    ids = np.concatenate([updates, inserts])
    np.random.default_rng(7).shuffle(ids)
    return ids


def gen_source(directory: str, rows: int, target_rows: int) -> None:
    import pyarrow.parquet as pq

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(wide_table(source_ids(rows, target_rows), tag="s"), out / "source.parquet")


def merge(source: str, target: str, kwargs: dict) -> None:
    from memsafe_dagster.datasets import PyarrowDatasetIO

    try:
        result = PyarrowDatasetIO().merge(source, target, "upsert", ["id"], **kwargs)
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        raise SystemExit(3) from None
    print(json.dumps(result.to_dict(), default=str))


def stream(path: str) -> None:
    import pyarrow.compute as pc

    from memsafe_dagster.datasets import process_in_chunks

    rows = chunks = largest = id_sum = 0
    for chunk in process_in_chunks(path):
        rows += chunk.num_rows
        chunks += 1
        largest = max(largest, chunk.num_rows)
        id_sum += pc.sum(chunk.column("id")).as_py() or 0
    print(json.dumps({"rows": rows, "chunks": chunks, "largest": largest, "id_sum": id_sum}))


def verify(target: str, target_rows: int, source_rows: int) -> None:
    """Every id exactly once, every row as the merge must have left it."""
    import numpy as np
    import pyarrow.compute as pc

    from memsafe_dagster.datasets import process_in_chunks

    ids_from_source = source_ids(source_rows, target_rows)
    total = target_rows + source_rows - source_rows // 2
    updated = np.zeros(total, bool)
    updated[ids_from_source] = True
    seen = np.zeros(total, np.int8)
    rows = 0
    for chunk in process_in_chunks(target, chunk_size_rows=20_000):
        ids = chunk.column("id").to_numpy()
        assert ids.min() >= 0 and ids.max() < total, "unexpected id"
        np.add.at(seen, ids, 1)
        for tag, mask in (("s", updated[ids]), ("t", ~updated[ids])):
            if not mask.any():
                continue
            part = chunk.filter(mask)
            expected = wide_table(part.column("id").to_numpy(), tag)
            for name in expected.column_names:
                assert pc.all(pc.equal(part.column(name), expected.column(name))).as_py(), name
        rows += chunk.num_rows
    assert rows == total, (rows, total)
    assert (seen == 1).all(), "an id is missing or duplicated"
    print(json.dumps({"rows": rows, "updated": int(updated[:target_rows].sum())}))


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "gen-wide":
        gen_wide(args[0], int(args[1]), int(args[2]))
    elif command == "gen-source":
        gen_source(args[0], int(args[1]), int(args[2]))
    elif command == "gen-narrow":
        gen_narrow(args[0], int(args[1]))
    elif command == "seed-loop":
        seed_loop(args[0], args[1], args[2])
    elif command == "merge":
        merge(args[0], args[1], json.loads(args[2]) if len(args) > 2 else {})
    elif command == "stream":
        stream(args[0])
    elif command == "verify":
        verify(args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown command {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
