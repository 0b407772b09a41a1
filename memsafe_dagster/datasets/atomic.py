"""Atomic create-if-absent on each filesystem: the primitive the dataset lock and the commit
point (the exclusive create of a log entry) rest on.

``exclusive_create(fs, path, data)`` creates ``path`` only if nothing is there, and returns
False when something is. Of any number of writers racing on one path, exactly one gets True
where the backend makes the check and the write one atomic step:

- **Local disks**: ``open(O_CREAT | O_EXCL)``; the kernel refuses the second create (POSIX).
  On NFS this needs NFSv3 or later (older clients emulate ``O_EXCL`` non-atomically).
- **S3** (s3fs 2024.12.0 or later, with a botocore whose ``PutObject`` knows ``IfNoneMatch``):
  ``pipe_file(mode="create")`` sends ``PUT`` with ``If-None-Match: *``; S3 evaluates the
  condition and the write atomically (AWS S3 since August 2024; MinIO and other S3 servers
  vary) and answers 412, which s3fs raises as ``FileExistsError``.
- **Google Cloud Storage** (gcsfs 2024.12.0 or later): ``pipe_file(mode="create")`` uploads
  with ``ifGenerationMatch=0`` (a precondition GCS checks atomically with the write: "no live
  version of this object"); a 412 is raised as ``FileExistsError``. Not on zonal buckets:
  gcsfs (2025.12.0 on, ``ExtendedGcsFileSystem``) writes those through gRPC appendable objects
  with no precondition, so ``mode="create"`` silently overwrites there; such a bucket is
  detected and gets the check-then-write below, with its warning.
- **Azure Blob Storage** (adlfs 2024.12.0 or later, ``abfs://``/``az://``):
  ``pipe_file(mode="create")`` is ``upload_blob(overwrite=False)``, for which azure-storage-blob
  sends ``If-None-Match: *``; the service refuses an existing blob (409 ``BlobAlreadyExists``,
  raised as ``FileExistsError``).
- **Anything else** (and the versions above that lack these APIs): check-then-write, which two
  writers can both pass; a one-time warning names the risk: run one writer at a time there.

On the object stores a create whose response was lost may be retried by the client library
and then reports False for the object it created itself: the caller sees "taken", never two
winners.
"""

from __future__ import annotations

import logging
import os
import re
from importlib import metadata

import fsspec

from memsafe_dagster.datasets.filesystem import is_local, protocols

log = logging.getLogger(__name__)

S3_PROTOCOLS = ("s3", "s3a")
GCS_PROTOCOLS = ("gs", "gcs")
AZURE_PROTOCOLS = ("abfs", "abfss", "az")
# First releases whose pipe_file(mode="create") is an atomic create-if-absent.
MIN_VERSIONS = {"s3fs": (2024, 12), "gcsfs": (2024, 12), "adlfs": (2024, 12)}

_warned_no_exclusive: set[str] = set()
_capable: dict[str, bool] = {}
_zonal_buckets: dict[str, bool] = {}  # GCS bucket names are global


def _version_at_least(dist: str, minimum: tuple[int, int]) -> bool:
    try:
        found = re.match(r"(\d+)\.(\d+)", metadata.version(dist))
    except metadata.PackageNotFoundError:
        return False
    return found is not None and (int(found[1]), int(found[2])) >= minimum


def _botocore_has_if_none_match() -> bool:
    try:
        import botocore.session

        model = botocore.session.get_session().get_service_model("s3")
        return "IfNoneMatch" in model.operation_model("PutObject").input_shape.members
    except Exception:  # no botocore, or a model without the operation
        return False


def _library(fs: fsspec.AbstractFileSystem) -> str | None:
    """The distribution whose ``mode="create"`` this filesystem would use, if any."""
    names = protocols(fs)
    modules = {cls.__module__.split(".")[0] for cls in type(fs).__mro__}
    for dist, known in (
        ("s3fs", S3_PROTOCOLS),
        ("gcsfs", GCS_PROTOCOLS),
        ("adlfs", AZURE_PROTOCOLS),
    ):
        if dist in modules and any(p in known for p in names):
            return dist
    return None


def supports_exclusive_create(fs: fsspec.AbstractFileSystem) -> bool:
    """True when ``fs`` has an atomic create-if-absent: local disks, S3 (s3fs), GCS (gcsfs; not
    zonal buckets, which ``exclusive_create`` detects) and Azure Blob (adlfs)."""
    if is_local(fs):
        return True
    dist = _library(fs)
    if dist is None:
        return False
    if dist not in _capable:
        ok = _version_at_least(dist, MIN_VERSIONS[dist])
        _capable[dist] = ok and (dist != "s3fs" or _botocore_has_if_none_match())
    return _capable[dist]


def _zonal_bucket(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """True when ``path`` is in a GCS zonal bucket (or its type cannot be told), where gcsfs
    ignores ``mode="create"``; False for every other bucket and for gcsfs without zonal
    support."""
    lookup = getattr(fs, "_is_zonal_bucket", None)
    if lookup is None:  # the plain GCSFileSystem writes every bucket through the JSON API
        return False
    bucket = fs.split_path(path)[0]
    if bucket not in _zonal_buckets:
        try:
            _zonal_buckets[bucket] = bool(fsspec.asyn.sync(fs.loop, lookup, bucket))
        except Exception:
            return True  # unknown: do not claim exclusivity
    return _zonal_buckets[bucket]


def _warn_once(fs: fsspec.AbstractFileSystem, why: str) -> None:
    name = type(fs).__name__
    if name not in _warned_no_exclusive:
        _warned_no_exclusive.add(name)
        log.warning(
            "%s %s: memsafe cannot fence concurrent writers there (two writers may both "
            "commit and duplicate rows); run one writer at a time",
            name,
            why,
        )


def _create_local(path: str, data: bytes) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return True


def _create_conditional(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except Exception as exc:
        # azure-storage-blob raises a failed condition (412) as ResourceModifiedError, which
        # adlfs does not translate; with If-None-Match: * it means the blob exists.
        if type(exc).__name__ != "ResourceModifiedError":
            raise
        return False
    finally:
        fs.invalidate_cache(path.rsplit("/", 1)[0])
    return True


def check_then_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``path`` if it does not exist yet: NOT atomic (two writers can both pass the
    check); the fallback where no atomic create exists."""
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def exclusive_create(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist; False when it does.

    Atomic where ``supports_exclusive_create`` (see the module docstring); elsewhere
    check-then-write with a one-time warning naming the risk.
    """
    if is_local(fs):
        return _create_local(path, data)
    if supports_exclusive_create(fs):
        if _library(fs) == "gcsfs" and _zonal_bucket(fs, path):
            _warn_once(fs, "ignores mode='create' on zonal buckets (no atomic create-if-absent)")
        else:
            return _create_conditional(fs, path, data)
    else:
        _warn_once(fs, "has no atomic create-if-absent")
    return check_then_write(fs, path, data)
