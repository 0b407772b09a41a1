"""Run a command under a real memory cap: a child cgroup of this process's own memory cgroup.

This is how tests and benchmarks prove memory claims the way the kernel enforces them (the
OOM killer, exit 137), and how a user can try a job under the budget of the pod it will run in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from memsafe_dagster.memory.limits import _locate_memory_cgroup
from memsafe_dagster.memory.sizes import parse_memory_size


class CgroupCapUnavailable(RuntimeError):
    """No child memory cgroup can be created here; the message says why."""


@dataclass(frozen=True)
class CappedRun:
    """What a (capped) command did: exit code, whether the OOM killer struck, and its peaks."""

    returncode: int
    oom_killed: bool
    timed_out: bool
    peak_rss_bytes: int
    cgroup_peak_bytes: int | None
    wall_s: float
    stdout: str
    stderr: str

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_bytes / (1024 * 1024)


class MemoryCap:
    """A child memory cgroup with a hard limit; processes started inside it are capped.

    Usage: ``with MemoryCap("512m") as cap: subprocess.Popen(..., preexec_fn=cap.enter)``.
    The cgroup is removed on exit (its remaining processes are killed first).
    """

    def __init__(self, limit: int | str, *, name: str | None = None, root: str = "/") -> None:
        self.limit_bytes = parse_memory_size(limit)
        version, parent, _mount = _locate_memory_cgroup(root)
        if parent is None:
            raise CgroupCapUnavailable("no memory cgroup found in /proc/self/cgroup")
        self.version = version
        self.parent = Path(parent)
        self.path = self.parent / (name or f"memsafe-cap-{uuid.uuid4().hex[:12]}")

    @classmethod
    def unavailable_reason(cls, root: str = "/") -> str | None:
        """None when a capped cgroup can be made here, else the reason it cannot."""
        try:
            with cls("64m", root=root):
                return None
        except CgroupCapUnavailable as exc:
            return str(exc)

    def __enter__(self) -> MemoryCap:
        try:
            if self.version == 2:
                self._enable_v2_memory_controller()
            self.path.mkdir()
        except OSError as exc:
            raise CgroupCapUnavailable(f"cannot create cgroup {self.path}: {exc}") from exc
        limit_file = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        try:
            self._write(limit_file, str(self.limit_bytes))
            if self.version == 2 and (self.path / "memory.swap.max").exists():
                self._write("memory.swap.max", "0")
        except OSError as exc:
            self._remove()
            raise CgroupCapUnavailable(f"cannot set {limit_file} in {self.path}: {exc}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()
        self._remove()

    def enter(self) -> None:
        """Move the calling process into the cgroup (use as ``preexec_fn``)."""
        with open(self.path / "cgroup.procs", "w") as fh:
            fh.write(str(os.getpid()))

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def kill_all(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def peak_bytes(self) -> int | None:
        """The cgroup's usage high-water mark (includes page cache the kernel could reclaim)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def oom_kills(self) -> int:
        """How many processes the OOM killer killed in this cgroup."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def _write(self, name: str, value: str) -> None:
        with open(self.path / name, "w") as fh:
            fh.write(value)

    def _enable_v2_memory_controller(self) -> None:
        control = self.parent / "cgroup.subtree_control"
        if "memory" in control.read_text().split():
            return
        try:
            control.write_text("+memory")
        except OSError as exc:
            raise CgroupCapUnavailable(
                f"memory controller not delegated to children of {self.parent} ({exc}); "
                "cgroup v2 forbids it while the parent holds processes"
            ) from exc

    def _remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


def _vm_hwm(pid: int) -> int:
    """A process's own RSS high-water mark (VmHWM), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (via /proc/<pid>/task/<tid>/children)."""
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children", "rb") as fh:
                    queue.extend(int(child) for child in fh.read().split())
            except (OSError, ValueError):
                continue
    return tree


def run_capped(
    argv: Sequence[str],
    limit: int | str,
    *,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> CappedRun:
    """Run ``argv`` inside a fresh cgroup capped at ``limit``; peaks come from the OS.

    See ``run_measured`` for how the peak is taken; ``cgroup_peak_bytes`` is the cgroup's own
    high-water mark (it includes page cache the kernel may reclaim).
    """
    with MemoryCap(limit) as cap:
        return run_measured(argv, timeout_s=timeout_s, env=env, cwd=cwd, cap=cap)


def run_measured(
    argv: Sequence[str],
    *,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    cap: MemoryCap | None = None,
) -> CappedRun:
    """Run ``argv`` (optionally inside ``cap``) and report its exit, wall time and peak RSS.

    ``peak_rss_bytes`` is the largest kernel high-water mark (VmHWM) of the child or any
    descendant, read every 5 ms. VmHWM only rises, so a read at any time after the peak sees
    it. ``wait4``'s ``ru_maxrss`` is not used: a child inherits its parent's RSS at fork.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=cap.enter if cap is not None else None,
            start_new_session=True,
        )
        timed_out = False
        peak = 0
        deadline = None if timeout_s is None else started + timeout_s
        while True:
            for member in _process_tree(proc.pid):
                peak = max(peak, _vm_hwm(member))
            pid, status, _usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                timed_out = True
                _kill_group(proc.pid)
                if cap is not None:
                    cap.kill_all()
                pid, status, _usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if cap is not None:
            cap.kill_all()  # stray grandchildren must not outlive the measurement
        else:
            _kill_group(proc.pid)
        out.seek(0)
        err.seek(0)
        # The OOM killer's count is authoritative; SIGKILL inside a cap without a timeout is
        # the same verdict on kernels that do not count.
        oom = cap is not None and (
            cap.oom_kills() > 0 or (proc.returncode == -signal.SIGKILL and not timed_out)
        )
        return CappedRun(
            returncode=proc.returncode,
            oom_killed=oom
            or (cap is not None and proc.returncode == -signal.SIGKILL and not timed_out),
            timed_out=timed_out,
            peak_rss_bytes=peak,
            cgroup_peak_bytes=cap.peak_bytes() if cap is not None else None,
            wall_s=wall,
            stdout=out.read().decode("utf-8", "replace"),
            stderr=err.read().decode("utf-8", "replace"),
        )


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
