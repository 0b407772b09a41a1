"""An inbox: a directory (any fsspec URL) where Parquet files land to be merged exactly once.

Files are identified by name, size and modification time, so a batch has a stable key (the
sensor's run key), and a file rewritten under the same name is a new file. After the merge that
consumed them commits, files move to ``<inbox>/_processed/<batch key>/``, which every listing
skips: a crash before the move merges them again into the same result (an upsert of the same
rows is idempotent); a crash after it leaves nothing to redo.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

import fsspec

from memsafe_dagster.datasets.filesystem import is_hidden, join

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
