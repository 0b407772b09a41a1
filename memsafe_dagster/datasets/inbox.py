"""An inbox: a directory (any fsspec URL) where Parquet files land to be merged exactly once.

Files are identified by name, size and modification time, so a batch has a stable key (the
sensor's run key), and a file rewritten under the same name is a new file. A run merges the
files it was asked for (``select_batch``) as one lazy dataset (``batch_dataset``). After the
merge that consumed them commits, files move to ``<inbox>/_processed/<batch key>/``, which every
listing skips: a crash before the move merges them again into the same result (an upsert of
the same rows is idempotent); a crash after it leaves nothing to redo.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from memsafe_dagster.datasets.filesystem import arrow_filesystem, is_hidden, join

if TYPE_CHECKING:
    # Imported where used: pyarrow.dataset loads pandas when it is installed.
    import pyarrow.dataset as ds

PROCESSED_DIR = "_processed"


@dataclass(frozen=True, order=True)
class InboxFile:
    """One file waiting in the inbox: its path (without protocol), size and mtime."""

    path: str
    size: int
    mtime: float

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def list_inbox(
    fs: fsspec.AbstractFileSystem, inbox: str, pattern: str = "*.parquet"
) -> list[InboxFile]:
    """Files in ``inbox`` matching ``pattern`` (a glob relative to it), oldest first.

    Hidden paths (``_processed/``, ``.tmp`` files of writers still uploading) are skipped.
    """
    inbox = inbox.rstrip("/")
    if not fs.exists(inbox):
        return []
    files = []
    for path in fs.glob(join(inbox, pattern)):
        relative = path[len(inbox) :].lstrip("/") if path.startswith(inbox) else path
        if is_hidden(relative) or not fs.isfile(path):
            continue
        files.append(inbox_file(fs, path))
    return sorted(files, key=lambda f: (f.mtime, f.path))


def inbox_file(fs: fsspec.AbstractFileSystem, path: str) -> InboxFile:
    """The ``InboxFile`` (size, mtime) of one existing file, as a listing would give it."""
    info = fs.info(path)
    return InboxFile(path=path, size=int(info.get("size") or 0), mtime=_mtime(fs, path))


def select_batch(
    fs: fsspec.AbstractFileSystem,
    inbox: str,
    pattern: str,
    requested: Sequence[str],
    *,
    log: Callable[[str], None] | None = None,
) -> list[InboxFile]:
    """The files of one run, oldest first: those ``requested`` (names, paths or URLs inside
    ``inbox``), or every file matching ``pattern`` when none are.

    A requested file an earlier run already merged and archived is skipped (``log`` says so):
    a sensor's run that is retried after its commit must not fail. Any other missing file is
    a ValueError.
    """
    inbox = inbox.rstrip("/")
    if not requested:
        return list_inbox(fs, inbox, pattern)
    batch = []
    for raw in requested:
        path = inbox_member(fs, inbox, raw)
        if not fs.exists(path):
            name = path.rsplit("/", 1)[-1]
            processed = fs.glob(join(inbox, PROCESSED_DIR, "*", name))
            if processed:
                if log is not None:
                    log(f"memsafe: {name} was already merged (now {processed[0]})")
                continue
            raise ValueError(f"inbox file {raw!r} not found in {inbox}")
        batch.append(inbox_file(fs, path))
    return sorted(batch, key=lambda f: (f.mtime, f.path))


def inbox_member(fs: fsspec.AbstractFileSystem, inbox: str, raw: str) -> str:
    """``raw`` (a URL, an absolute path, or a path relative to the inbox) as a path inside
    ``inbox``; anything else (outside it, hidden, ``..``) is a ValueError."""
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"files: {raw!r} is not a file name or path")
    inbox = inbox.rstrip("/")
    # A path as a listing gives it (on an object store: "bucket/inbox/x", no leading "/").
    absolute = "://" in raw or raw.startswith(("/", inbox + "/"))
    stripped = fs._strip_protocol(raw) if absolute else join(inbox, raw)
    relative = stripped[len(inbox) :].lstrip("/") if stripped.startswith(inbox + "/") else None
    if not relative or ".." in relative.split("/") or is_hidden(relative):
        raise ValueError(f"files: {raw!r} is not a file in the inbox {inbox}")
    return stripped


def batch_dataset(fs: fsspec.AbstractFileSystem, batch: Sequence[InboxFile]) -> ds.Dataset:
    """The batch's files as one lazy dataset, in batch order (oldest first).

    Its schema unifies the files' own (a column only some files have is kept, null elsewhere),
    so the merge sees every column and refuses one the target does not know.
    """
    import pyarrow.dataset as ds

    afs = arrow_filesystem(fs)
    schemas = []
    for f in batch:
        with afs.open_input_file(f.path) as fh:
            schemas.append(pq.ParquetFile(fh, pre_buffer=False).schema_arrow)
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        names = ", ".join(f.name for f in batch)
        raise ValueError(f"inbox files {names} have incompatible schemas: {exc}") from None
    return ds.dataset([f.path for f in batch], schema=schema, filesystem=afs, format="parquet")


def batch_key(files: Iterable[InboxFile]) -> str:
    """A stable key for a set of files (names, sizes, mtimes): the sensor's run key."""
    payload = json.dumps(sorted((f.name, f.size, round(f.mtime, 3)) for f in files))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def archive(
    fs: fsspec.AbstractFileSystem, inbox: str, files: Sequence[InboxFile], key: str
) -> list[str]:
    """Move merged files to ``<inbox>/_processed/<key>/``; returns their new paths."""
    target_dir = join(inbox.rstrip("/"), PROCESSED_DIR, key)
    fs.makedirs(target_dir, exist_ok=True)
    moved = []
    for f in files:
        destination = join(target_dir, f.name)
        with contextlib.suppress(FileNotFoundError):  # an earlier attempt already moved it
            fs.mv(f.path, destination)
        moved.append(destination)
    return moved


def _mtime(fs: fsspec.AbstractFileSystem, path: str) -> float:
    try:
        modified = fs.modified(path)
    except (NotImplementedError, FileNotFoundError, OSError, AttributeError):
        modified = None
    if isinstance(modified, datetime):
        return modified.timestamp()
    info = fs.info(path)
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0
