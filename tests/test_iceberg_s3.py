"""Iceberg merges on a real S3 API: moto's ThreadedMotoServer on loopback, the warehouse in a
bucket, the SQL catalog on SQLite. Both pyiceberg FileIOs (PyArrow's native S3 and fsspec's
s3fs): the merge reads and writes through the table's own storage configuration, commits one
snapshot, deletes its objects when it fails, and the orphan sweep works on object storage.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from iceberg_helpers import check_metadata_complete, create_table, make_catalog, scan
from merge_helpers import dict_rows_set, oracle, row_set, rows_of
from s3_helpers import LockedMotoServer

from memsafe_dagster.datasets import merge_iceberg
from memsafe_dagster.datasets.iceberg import iceberg_dataset, remove_orphan_files
from memsafe_dagster.datasets.iceberg.storage import TableStorage

boto3 = pytest.importorskip("boto3")
requests = pytest.importorskip("requests")

BUCKET = "iceberg-bucket"
SCHEMA = pa.schema([("k", pa.int64()), ("v", pa.string())])
ROOM = {"merge_min_system_available_mb": 0}
FILE_IOS = {
    "pyarrow": "pyiceberg.io.pyarrow.PyArrowFileIO",
    "fsspec": "pyiceberg.io.fsspec.FsspecFileIO",
}


@pytest.fixture(scope="module")
def moto_endpoint():
    mp = pytest.MonkeyPatch()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    server = LockedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    mp.undo()


@pytest.fixture
def s3_bucket(moto_endpoint):
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10)
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


def objects(client) -> set[str]:
    """The bucket's objects, without the empty directory markers PyArrow's S3 may leave."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    keys = {o["Key"] for page in pages for o in page.get("Contents", [])}
    return {k for k in keys if not k.endswith("/")}


@pytest.fixture(params=sorted(FILE_IOS))
def s3_catalog(request, tmp_path: Path, moto_endpoint, s3_bucket):
    return make_catalog(
        tmp_path / "cat",
        warehouse=f"s3://{BUCKET}/warehouse",
        **{
            "py-io-impl": FILE_IOS[request.param],
            "s3.endpoint": moto_endpoint,
            "s3.access-key-id": "testing",
            "s3.secret-access-key": "testing",
            "s3.region": "us-east-1",
        },
    )


def rows(keys, tag: str) -> pa.Table:
    keys = list(keys)
    return pa.table({"k": keys, "v": [f"{tag}{k}" for k in keys]}, schema=SCHEMA)


def test_upsert_into_a_table_on_s3(s3_catalog) -> None:
    table = create_table(
        s3_catalog, "ns.t", SCHEMA, [rows(range(0, 40), "t"), rows(range(40, 80), "t")]
    )
    assert table.location().startswith(f"s3://{BUCKET}/")
    parent = table.current_snapshot().snapshot_id
    before = scan(table)
    source = rows(range(30, 50), "s")
    expected, counts = oracle(
        rows_of(before, ["k", "v"]), rows_of(source, ["k", "v"]), "upsert", ["k"]
    )
    result = merge_iceberg(source, table, "upsert", "k", target_file_rows=16, **ROOM)
    assert (result.updated, result.inserted) == (counts["updated"], counts["inserted"]) == (20, 0)
    assert result.files_rewritten == 2
    assert table.current_snapshot().parent_snapshot_id == parent
    assert row_set(scan(table)) == dict_rows_set(expected, ["k", "v"])
    assert row_set(scan(table, parent)) == row_set(before)
    assert row_set(iceberg_dataset(table).to_table()) == row_set(scan(table))
    # The written objects are Iceberg data files with field ids, in the bucket.
    storage = TableStorage(table)
    for task in table.scan().plan_files():
        with storage.afs.open_input_file(storage.path(task.file.file_path)) as fh:
            schema = pq.read_schema(fh)
        assert schema.field("k").metadata[b"PARQUET:field_id"] == b"1"
    check_metadata_complete(table)


def test_a_failed_merge_on_s3_deletes_its_objects(s3_catalog, s3_bucket) -> None:
    table = create_table(s3_catalog, "ns.t", SCHEMA, [rows(range(0, 40), "t")])
    snapshot = table.current_snapshot().snapshot_id
    before = objects(s3_bucket)

    def batches():
        for i in range(4):
            yield rows(range(100 + i * 10, 110 + i * 10), "s").to_batches()[0]
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        merge_iceberg(batches(), table, "upsert", "k", target_file_rows=10, **ROOM)
    assert table.refresh().current_snapshot().snapshot_id == snapshot
    assert objects(s3_bucket) == before


def test_orphan_sweep_on_s3(s3_catalog, s3_bucket) -> None:
    table = create_table(s3_catalog, "ns.t", SCHEMA, [rows(range(0, 10), "t")])
    merge_iceberg(rows(range(5, 15), "s"), table, "upsert", "k", **ROOM)
    prefix = table.location().removeprefix(f"s3://{BUCKET}/")
    orphan = f"{prefix}/data/ins-killed-00000.parquet"
    s3_bucket.put_object(Bucket=BUCKET, Key=orphan, Body=b"PAR1")
    live = objects(s3_bucket) - {orphan}
    assert remove_orphan_files(table, older_than=dt.timedelta(hours=1)) == []
    removed = remove_orphan_files(table, older_than=dt.timedelta(0))
    assert removed == [f"{BUCKET}/{orphan}"]
    assert objects(s3_bucket) == live
    check_metadata_complete(table)
