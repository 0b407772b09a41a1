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
    """``files`` files, each a single row group (what pandas and pyarrow write by default)."""
    import numpy as np
    import pyarrow.parquet as pq

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        first = wide_table(np.zeros(0, np.int64)).schema
        with pq.ParquetWriter(out / f"part-{f:03d}.parquet", first) as writer:
            # One row group of rows_per_file rows, written without holding it whole.
            ids = np.arange(f * rows_per_file, (f + 1) * rows_per_file, dtype=np.int64)
            table = wide_table(ids)
            writer.write_table(table, row_group_size=rows_per_file)
            del table


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

    result = PyarrowDatasetIO().merge(source, target, "upsert", ["id"], **kwargs)
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
