"""Crash-safe commits to a Parquet dataset directory, and the lock that keeps writers apart.

Protocol (state lives under ``<target>/_memsafe/``, which every reader skips):

1. take the lock (``_memsafe/lock``), then ``recover`` whatever an earlier writer left;
2. stage new files under ``_memsafe/staging/<txn>/``;
3. write the commit record ``_memsafe/commits/<txn>.json`` (temp file + rename on local
   disks, one PUT on object stores), naming the log version it will commit as;
4. the commit point: create the log entry ``_memsafe/log/<version>.json`` *exclusively*
   (``O_EXCL`` on local disks, ``If-None-Match: *`` on S3). ``version`` is the latest log
   version this writer read under the lock plus one, so when another writer committed in the
   meantime (a lost or broken lock) the create fails and this writer gets
   ``CommitConflictError``: two writers can never both commit against the same base, whatever
   the lock did (optimistic concurrency, as table formats do);
5. apply it: move staged files to their final names and the files it replaces to
   ``_memsafe/trash/<version>/`` (not deleted: a reader holding the snapshot before this
   commit still reads them there; see ``snapshot``). SIGTERM and SIGINT are held from step 3
   until this step is done, so a terminated run finishes its commit before it stops and
   releases the lock;
6. delete the record and the staging directory; delete the history older than the retention
   (``MEMSAFE_SNAPSHOT_RETENTION_S``, default one hour): trash directories, and log entries
   that are also more than ``LOG_KEEP_VERSIONS`` versions behind (the latest always stays: the
   fence needs it); release the lock.

A crash before step 4 leaves staging and perhaps a record without its log entry, which
recovery deletes: the dataset is as before. A crash after it leaves a record whose log entry
exists, which recovery applies again (every step is idempotent): the dataset is as after.
Records without a ``log_version`` (written by earlier releases) are rolled forward as before.
Readers need neither the lock nor recovery: ``snapshot`` folds a committed, unapplied record
into what it lists, so a half-applied commit already reads as after.

The fence stays sound although old log entries are deleted: just before its exclusive create
a writer checks that the latest version is still its base (one listing), and an entry is only
deleted once it is ``LOG_KEEP_VERSIONS`` behind the latest and older than the retention. A
version that did not exist at the check cannot have been created and deleted again by the
time of the create, short of a stall longer than the retention between the two.

The lock is a lease: its holder (host, pid, token) and an expiry that a thread renews while
the holder works. A lock whose lease expired is broken automatically with a warning, from any
host; on this host a lock of a dead process is broken at once. The lock only keeps writers
from wasting work: correctness rests on the exclusive create of step 4 (the fence). On a
filesystem with no exclusive create (see ``atomic``: local disks, S3, GCS and Azure Blob have
one) the log entry is written check-then-write and a warning names the risk: run one writer at
a time there.

Final names are new (``part-<txn>-NNNNN.parquet``), so a replayed move can never clobber live
data; a write that reuses names (``part-NNNNN.parquet`` of a replacing writer) moves the old
file to the trash before the new one takes its name, and a replay moves only what is still
staged. Empty state directories are removed when a transaction ends, so a failed first write
leaves the target exactly as it was.

Tests kill the writer at each step: with ``MEMSAFE_CRASH_AT=<step>`` in the environment the
process SIGKILLs itself when it reaches that step (``crash_point``; steps are listed in
``CRASH_POINTS``). Unset, the hook costs one dict lookup.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from memsafe_dagster.datasets.atomic import exclusive_create
from memsafe_dagster.datasets.filesystem import is_local, join

log = logging.getLogger(__name__)

STATE_DIR = "_memsafe"
RECORD_VERSION = 1
CRASH_ENV = "MEMSAFE_CRASH_AT"
CRASH_POINTS = (
    "commit-staged",  # every file staged, no record yet
    "commit-recorded",  # record written, nothing applied
    "commit-moved-one",  # first staged file moved to its final name
    "commit-moved",  # every file moved, nothing removed
    "commit-removed-one",  # first replaced file moved to the trash
    "commit-applied",  # applied, record not yet deleted
    "commit-record-deleted",  # record deleted, staging not yet removed
)


def crash_point(name: str) -> None:
    """Die by SIGKILL here when ``MEMSAFE_CRASH_AT`` names this step (fault-injection tests)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class DatasetLockedError(RuntimeError):
    """Another writer holds the dataset's lock; the message names it and what to do."""


class CommitConflictError(RuntimeError):
    """Another writer committed to the dataset since this one read it; nothing was changed."""


class CommitError(RuntimeError):
    """A commit record cannot be applied (its files are gone); the dataset needs a human."""


@dataclass(frozen=True)
class CommitRecord:
    """The files one transaction adds (staged -> final) and removes, relative to the target."""

    txn: str
    operation: str
    add: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]
    created_at: float
    info: dict[str, Any] = field(default_factory=dict)
    log_version: int | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": RECORD_VERSION,
                "txn": self.txn,
                "operation": self.operation,
                "created_at": self.created_at,
                "add": [{"staged": s, "path": p} for s, p in self.add],
                "remove": list(self.remove),
                "info": self.info,
                "log_version": self.log_version,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> CommitRecord:
        try:
            doc = json.loads(data)
            return cls(
                txn=doc["txn"],
                operation=doc["operation"],
                add=tuple((a["staged"], a["path"]) for a in doc["add"]),
                remove=tuple(doc["remove"]),
                created_at=float(doc["created_at"]),
                info=dict(doc.get("info") or {}),
                log_version=doc.get("log_version"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CommitError(f"commit record {where} is unreadable: {exc}") from exc


@dataclass
class RecoveryReport:
    """What ``recover`` did: commits rolled forward, orphaned staging removed, lock broken."""

    rolled_forward: list[str] = field(default_factory=list)
    orphans_removed: list[str] = field(default_factory=list)
    lock_broken: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.rolled_forward or self.orphans_removed or self.lock_broken)


# -- exclusive create and the commit log ------------------------------------------------------

LOG_DIR = "log"
TRASH_DIR = "trash"
DEFAULT_LEASE_S = 30.0
RETENTION_ENV = "MEMSAFE_SNAPSHOT_RETENTION_S"
DEFAULT_RETENTION_S = 3600.0
LOG_KEEP_VERSIONS = 100


def log_path(target: str, version: int) -> str:
    return join(target, STATE_DIR, LOG_DIR, f"{version:012d}.json")


def retention_s() -> float:
    """How long removed files and old log entries are kept for readers (seconds)."""
    raw = os.environ.get(RETENTION_ENV)
    return DEFAULT_RETENTION_S if not raw else max(0.0, float(raw))


def trash_path(target: str, version: int, relative: str = "") -> str:
    """Where commit ``version`` keeps the file ``relative`` it removed."""
    base = join(target, STATE_DIR, TRASH_DIR, f"{version:012d}")
    return join(base, relative) if relative else base


def versioned(fs: fsspec.AbstractFileSystem, directory: str, *, detail: bool) -> dict[int, Any]:
    """``{version: listing entry}`` of the ``NNN...`` (or ``NNN.json``) names in ``directory``."""
    fs.invalidate_cache(directory)
    try:
        entries = fs.ls(directory, detail=detail)
    except FileNotFoundError:
        return {}
    out: dict[int, Any] = {}
    for entry in entries:
        name = (entry["name"] if detail else entry).rstrip("/").rsplit("/", 1)[-1]
        stem = name[:-5] if name.endswith(".json") else name
        if stem.isdigit():
            out[int(stem)] = entry
    return out


def latest_version(fs: fsspec.AbstractFileSystem, target: str) -> int:
    """The latest committed log version of ``target`` (0: no memsafe commit yet)."""
    versions = versioned(fs, join(target.rstrip("/"), STATE_DIR, LOG_DIR), detail=False)
    return max(versions, default=0)


def log_entry(fs: fsspec.AbstractFileSystem, target: str, version: int) -> dict[str, Any]:
    """The log entry of ``version`` ({} when it is missing or torn)."""
    try:
        return json.loads(fs.cat_file(log_path(target, version)))
    except (FileNotFoundError, ValueError):
        return {}


# -- the lock ---------------------------------------------------------------------------------


def _process_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is the state; a zombie is as dead as a missing process.
    return None if fields[0] == b"Z" else fields[19].decode()


def _holder_alive(holder: dict[str, Any]) -> bool:
    if holder.get("unreadable"):
        # Empty or torn: either a writer is between create and write (alive), or one was
        # killed there. Only age tells them apart.
        return time.time() - holder.get("mtime", 0.0) < 10.0
    expires = holder.get("expires_at")
    if holder.get("host") != socket.gethostname():
        # Another machine: only its lease tells (a lock without one is assumed alive).
        return not isinstance(expires, (int, float)) or time.time() < expires
    pid = int(holder.get("pid", -1))
    started = _process_start_time(pid)
    if started is not None:
        return holder.get("started") in (None, started)  # a reused PID is not the holder
    if os.path.exists("/proc/self/stat"):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DatasetLock:
    """An exclusive lock file ``<target>/_memsafe/lock`` holding a lease.

    A second writer waits up to ``timeout_s`` and then gets ``DatasetLockedError`` naming the
    holder. The holder (host, pid, token) renews its lease (``lease_s``) from a thread while
    it works; a lock whose lease expired, or held by a dead process on this host (``kill -9``,
    OOM kill), is broken automatically with a warning. The create is exclusive where the filesystem
    allows (``atomic``); correctness never rests on the lock alone (see the module docstring).
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        target: str,
        *,
        timeout_s: float = 30.0,
        lease_s: float | None = None,
    ) -> None:
        self.fs = fs
        self.target = target
        self.path = join(target, STATE_DIR, "lock")
        self.timeout_s = timeout_s
        self.lease_s = float(lease_s or os.environ.get("MEMSAFE_LEASE_S") or DEFAULT_LEASE_S)
        self.token = uuid.uuid4().hex
        self.held = False
        self.broke_stale = False
        self._acquired_at = 0.0
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _payload(self) -> bytes:
        pid = os.getpid()
        now = time.time()
        return json.dumps(
            {
                "token": self.token,
                "pid": pid,
                "host": socket.gethostname(),
                "started": _process_start_time(pid),
                "acquired_at": self._acquired_at or now,
                "lease_s": self.lease_s,
                "expires_at": now + self.lease_s,
            }
        ).encode()

    def _try_create(self) -> bool:
        if is_local(self.fs):
            try:
                return exclusive_create(self.fs, self.path, self._payload())
            except FileNotFoundError:
                # A finishing writer removed the empty state directory between our makedirs
                # and open; the next attempt recreates it.
                return False
        if not exclusive_create(self.fs, self.path, self._payload()):
            return False
        return self._read_holder().get("token") == self.token

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if self._read_holder().get("token") != self.token:
                    log.warning("lost the lock on %s (lease broken by another writer)", self.target)
                    return
                self.fs.pipe_file(self.path, self._payload())
            except Exception as exc:  # keep renewing through transient errors
                log.warning("renewing the lease on %s failed: %s", self.target, exc)

    def _read_holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return {}
        except ValueError:
            try:
                mtime = self.fs.modified(self.path).timestamp()
            except (FileNotFoundError, NotImplementedError, AttributeError):
                mtime = 0.0
            return {"unreadable": True, "mtime": mtime}

    def acquire(self) -> DatasetLock:
        deadline = time.monotonic() + self.timeout_s
        while True:
            self._acquired_at = time.time()
            if self._try_create():
                self.held = True
                self._stop.clear()
                self._renewer = threading.Thread(
                    target=self._renew_loop, name="memsafe-lease", daemon=True
                )
                self._renewer.start()
                return self
            holder = self._read_holder()
            if holder and not _holder_alive(holder):
                log.warning(
                    "breaking stale lock on %s held by pid %s on %s (dead or lease expired)",
                    self.target,
                    holder.get("pid"),
                    holder.get("host"),
                )
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.path)
                self.broke_stale = True
                continue
            if time.monotonic() >= deadline:
                raise DatasetLockedError(_locked_message(self.target, holder, self.timeout_s))
            time.sleep(0.05)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=5)
        if self._read_holder().get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)

    def __enter__(self) -> DatasetLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _locked_message(target: str, holder: dict[str, Any], waited: float) -> str:
    since = holder.get("acquired_at")
    age = f", for {time.time() - since:.0f}s" if isinstance(since, (int, float)) else ""
    return (
        f"dataset {target} is locked by another writer (pid {holder.get('pid')} on "
        f"{holder.get('host')}{age}); waited {waited:.0f}s. Two writers never interleave: retry "
        f"later, or if that process is gone for good run `memsafe recover {target} --break-lock`."
    )


# -- transactions -----------------------------------------------------------------------------


class DatasetTransaction:
    """Stage files, then commit them atomically (see the module docstring for the protocol).

    ``with DatasetTransaction(fs, target, operation="merge") as txn:`` takes the lock and
    recovers; ``txn.new_file()`` returns a staging path to write a new data file to;
    ``txn.remove(path)`` marks a live file for removal; ``txn.commit()`` publishes. Leaving the
    block without committing (an exception, a MemoryPressureError) discards the staging and
    leaves the target byte-for-byte unchanged.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        target: str,
        *,
        operation: str,
        lock_timeout_s: float = 30.0,
        durable: bool = False,
    ) -> None:
        self.fs = fs
        self.target = target.rstrip("/")
        self.operation = operation
        self.durable = durable
        self.lock = DatasetLock(fs, self.target, timeout_s=lock_timeout_s)
        self.txn = new_txn_id()
        self.staging = join(self.target, STATE_DIR, "staging", self.txn)
        self.recovery: RecoveryReport | None = None
        self._adds: list[tuple[str, str]] = []
        self._removes: list[str] = []
        self._committed: CommitRecord | None = None
        self._record_written = False
        self.base_version = 0

    def __enter__(self) -> DatasetTransaction:
        self.lock.acquire()
        try:
            self.recovery = _recover_locked(self.fs, self.target)
            self.recovery.lock_broken = self.lock.broke_stale
            self.base_version = latest_version(self.fs, self.target)
            self.fs.makedirs(self.staging, exist_ok=True)
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if self._committed is None:
                if self._record_written:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(_record_path(self.target, self.txn))
                _remove_tree(self.fs, self.staging)
            _tidy_state(self.fs, self.target)
        finally:
            self.lock.release()
            _rmdir_if_empty(self.fs, join(self.target, STATE_DIR))

    def new_file(self, relative_path: str | None = None, *, prefix: str = "part") -> str:
        """A staging path for a new data file; ``relative_path`` (inside the target) is its
        final name, by default a fresh ``<prefix>-<txn>-NNNNN.parquet``."""
        final = relative_path or f"{prefix}-{self.txn}-{len(self._adds):05d}.parquet"
        final = final.strip("/")
        staged_rel = f"{STATE_DIR}/staging/{self.txn}/{final}"
        self._adds.append((staged_rel, final))
        staged = join(self.target, staged_rel)
        parent = staged.rsplit("/", 1)[0]
        if parent != self.staging:
            self.fs.makedirs(parent, exist_ok=True)
        return staged

    def discard_file(self, staged_path: str) -> None:
        """Forget a staged file (e.g. a writer produced nothing for it) and delete it."""
        rel = staged_path[len(self.target) :].lstrip("/")
        self._adds = [(s, p) for s, p in self._adds if s != rel]
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(staged_path)

    def remove(self, path: str) -> None:
        """Mark a live data file (absolute, or relative to the target) for removal."""
        rel = path[len(self.target) :].lstrip("/") if path.startswith(self.target) else path
        self._removes.append(rel.strip("/"))

    @property
    def added(self) -> list[str]:
        """Final paths (absolute) of the files this transaction adds."""
        return [join(self.target, p) for _, p in self._adds]

    def commit(self, info: dict[str, Any] | None = None) -> CommitRecord:
        """Write the commit record, create the log entry (the point of no return: fails with
        ``CommitConflictError`` when another writer committed since this one began) and apply."""
        if self._committed is not None:
            raise RuntimeError("transaction already committed")
        record = CommitRecord(
            txn=self.txn,
            operation=self.operation,
            add=tuple(self._adds),
            remove=tuple(self._removes),
            created_at=time.time(),
            info=dict(info or {}),
            log_version=self.base_version + 1,
        )
        if self.durable and is_local(self.fs):
            for staged, _ in record.add:
                _fsync_file(join(self.target, staged))
        crash_point("commit-staged")
        with _signals_deferred():
            return self._commit(record)

    def _commit(self, record: CommitRecord) -> CommitRecord:
        _write_record(self.fs, self.target, record, durable=self.durable)
        self._record_written = True
        entry = json.dumps(
            {
                "version": record.log_version,
                "txn": record.txn,
                "operation": record.operation,
                "created_at": record.created_at,
                "holder": {"host": socket.gethostname(), "pid": os.getpid()},
            }
        ).encode()
        assert record.log_version is not None
        # The latest version must still be this writer's base: this also catches a base+1
        # that was committed and then deleted by the log cleanup (module docstring).
        latest = latest_version(self.fs, self.target)
        if latest != self.base_version or not exclusive_create(
            self.fs, log_path(self.target, record.log_version), entry
        ):
            raise CommitConflictError(
                f"dataset {self.target}: another writer committed version "
                f"{max(latest, record.log_version)} while this {self.operation} ran (it read "
                f"version {self.base_version}); nothing was changed. Run it again: it will see "
                "the other writer's rows."
            )
        self._committed = record
        crash_point("commit-recorded")
        _apply(self.fs, self.target, record)
        return record


_DEFERRED = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT from the commit point until the commit is applied.

    On the main thread the signals are blocked (``pthread_sigmask``) and delivered, with
    whatever handler is installed (Dagster's termination, Python's KeyboardInterrupt, the
    default kill), as soon as the commit is applied. Elsewhere this is a no-op.
    """
    import threading as _threading

    if _threading.current_thread() is not _threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def transaction(
    fs: fsspec.AbstractFileSystem, target: str, *, operation: str, lock_timeout_s: float = 30.0
) -> Iterator[DatasetTransaction]:
    """``DatasetTransaction`` as a plain context manager function."""
    with DatasetTransaction(fs, target, operation=operation, lock_timeout_s=lock_timeout_s) as t:
        yield t


def recover(
    fs: fsspec.AbstractFileSystem,
    target: str,
    *,
    break_lock: bool = False,
    lock_timeout_s: float = 30.0,
) -> RecoveryReport:
    """Roll half-applied commits forward and delete orphaned staging, under the lock.

    ``break_lock`` removes a lock held by a process that is gone for good (on another host,
    where liveness cannot be checked); use it only when no writer runs.
    """
    target = target.rstrip("/")
    lock = DatasetLock(fs, target, timeout_s=lock_timeout_s)
    broken = False
    if break_lock and fs.exists(lock.path):
        fs.rm_file(lock.path)
        broken = True
    if not fs.exists(join(target, STATE_DIR)):
        return RecoveryReport(lock_broken=broken)
    with lock:
        report = _recover_locked(fs, target)
        _tidy_state(fs, target)
    _rmdir_if_empty(fs, join(target, STATE_DIR))
    report.lock_broken = broken or lock.broke_stale
    return report


def pending_commits(fs: fsspec.AbstractFileSystem, target: str) -> list[str]:
    """Transaction ids of commit records not yet applied (a crashed writer left them)."""
    commits = join(target.rstrip("/"), STATE_DIR, "commits")
    if not fs.exists(commits):
        return []
    return sorted(
        p.rsplit("/", 1)[-1][: -len(".json")]
        for p in fs.ls(commits, detail=False)
        if p.endswith(".json")
    )


def new_txn_id() -> str:
    """A sortable, readable transaction id: UTC time to the millisecond plus 8 random hex."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}{int(now * 1000) % 1000:03d}-{uuid.uuid4().hex[:8]}"


# -- internals --------------------------------------------------------------------------------


def _record_path(target: str, txn: str) -> str:
    return join(target, STATE_DIR, "commits", f"{txn}.json")


def _write_record(
    fs: fsspec.AbstractFileSystem, target: str, record: CommitRecord, *, durable: bool
) -> None:
    final = _record_path(target, record.txn)
    temp = final + ".tmp"
    fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
    if is_local(fs):
        with open(temp, "wb") as fh:
            fh.write(record.to_json())
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(temp, final)  # atomic on POSIX: the record exists whole or not at all
        if durable:
            _fsync_dir(os.path.dirname(final))
    else:
        # Object stores publish a single PUT atomically.
        fs.pipe_file(final, record.to_json())


def _apply(fs: fsspec.AbstractFileSystem, target: str, record: CommitRecord) -> None:
    """Apply ``record``; safe to repeat after a crash at any point.

    Removed files go to the trash of the record's version, never deleted here; a file the
    record replaces under the same name goes there before the new one takes its name.
    """
    version = record.log_version or 0
    removes = set(record.remove)
    replaced = {path for _, path in record.add}
    for i, (staged_rel, final_rel) in enumerate(record.add):
        staged, final = join(target, staged_rel), join(target, final_rel)
        if fs.exists(staged):
            if final_rel in removes:
                _move(fs, final, trash_path(target, version, final_rel))
            _move(fs, staged, final)
        elif not fs.exists(final):
            raise CommitError(
                f"commit {record.txn} on {target}: staged file {staged_rel} and its final "
                f"name {final_rel} are both missing; the dataset needs manual repair"
            )
        if i == 0:
            crash_point("commit-moved-one")
    crash_point("commit-moved")
    removed = 0
    for final_rel in record.remove:
        if final_rel in replaced:
            continue
        _move(fs, join(target, final_rel), trash_path(target, version, final_rel))
        removed += 1
        if removed == 1:
            crash_point("commit-removed-one")
    crash_point("commit-applied")
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(_record_path(target, record.txn))
    crash_point("commit-record-deleted")
    _remove_tree(fs, join(target, STATE_DIR, "staging", record.txn))


def _move(fs: fsspec.AbstractFileSystem, source: str, dest: str) -> None:
    """Move one file, creating ``dest``'s parent; a missing ``source`` (moved already) is a
    no-op. Local disks: ``os.replace`` (atomic). Object stores: copy, then delete, so the
    file is at one of the two names at every instant."""
    parent = dest.rsplit("/", 1)[0]
    if is_local(fs):
        if not os.path.exists(source):
            return
        os.makedirs(parent, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(source, dest)
        return
    if not fs.exists(source):
        return
    fs.makedirs(parent, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        fs.mv(source, dest)


def _recover_locked(fs: fsspec.AbstractFileSystem, target: str) -> RecoveryReport:
    report = RecoveryReport()
    state = join(target, STATE_DIR)
    if not fs.exists(state):
        return report
    commits = join(state, "commits")
    if fs.exists(commits):
        for path in sorted(fs.ls(commits, detail=False)):
            if path.endswith(".json"):
                record = CommitRecord.from_json(fs.cat_file(path), path)
                if (
                    record.log_version is not None
                    and log_entry(fs, target, record.log_version).get("txn") != record.txn
                ):
                    # Recorded but never committed (killed before, or lost the race for, its
                    # log entry): the dataset is as before; drop the record and its staging.
                    log.warning("discarding uncommitted record %s on %s", record.txn, target)
                    fs.rm_file(path)
                    continue
                log.warning("rolling forward commit %s on %s", record.txn, target)
                _apply(fs, target, record)
                report.rolled_forward.append(record.txn)
            elif path.endswith(".tmp"):
                fs.rm_file(path)  # a record that never became a commit
    staging = join(state, "staging")
    if fs.exists(staging):
        for path in fs.ls(staging, detail=False):
            _remove_tree(fs, path)
            report.orphans_removed.append(path.rsplit("/", 1)[-1])
    return report


def _tidy_state(fs: fsspec.AbstractFileSystem, target: str) -> None:
    """Delete the history past the retention, then the state directories that are empty
    (never one holding a record or staging). Runs under the lock."""
    state = join(target, STATE_DIR)
    if fs.exists(state):
        clean_history(fs, target)
    for sub in ("staging", "commits", TRASH_DIR):
        _rmdir_if_empty(fs, join(state, sub))


def clean_history(
    fs: fsspec.AbstractFileSystem,
    target: str,
    *,
    retention: float | None = None,
    keep_versions: int | None = None,
    now: float | None = None,
) -> tuple[list[int], list[int]]:
    """Delete trash older than ``retention`` and log entries both older than it and more than
    ``keep_versions`` behind the latest (kept always); returns the (trash, log) versions
    deleted. The caller holds the lock. An entry's age is its listed modification time."""
    retention = retention_s() if retention is None else retention
    keep_versions = LOG_KEEP_VERSIONS if keep_versions is None else keep_versions
    now = time.time() if now is None else now
    entries = versioned(fs, join(target, STATE_DIR, LOG_DIR), detail=True)
    latest = max(entries, default=0)

    def age(version: int) -> float:
        entry = entries.get(version)
        if entry is None:
            return float("inf")  # its log entry went: older than the retention
        stamp = _mtime(entry)
        if stamp is None:
            stamp = float(log_entry(fs, target, version).get("created_at", 0.0))
        return now - stamp

    trashed = []
    for version in sorted(versioned(fs, join(target, STATE_DIR, TRASH_DIR), detail=False)):
        if age(version) > retention:
            _remove_tree(fs, trash_path(target, version))
            trashed.append(version)
    dropped = []
    for version in sorted(entries):  # oldest first: an entry goes only after those below it
        if version >= latest - keep_versions or age(version) <= retention:
            break
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(entries[version]["name"])
        dropped.append(version)
    return trashed, dropped


def _mtime(entry: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = entry.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
    return None


def _rmdir_if_empty(fs: fsspec.AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(OSError, FileNotFoundError, ValueError):
        if is_local(fs):
            os.rmdir(path)  # fails, harmlessly, when not empty
        elif fs.exists(path) and not fs.ls(path, detail=False):
            fs.rmdir(path)


def _remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        _fsync_file(path)
