"""``memsafe run --memory 512m -- CMD``: run a command under a real cgroup memory cap."""

from __future__ import annotations

import argparse
import sys

from memsafe_dagster.memory.cgroup_cap import CgroupCapUnavailable, run_capped


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a command under a real memory cap (a child cgroup), report its peak",
    )
    parser.add_argument("--memory", required=True, help="the cap, e.g. 512m or 2Gi")
    parser.add_argument("--timeout", type=float, default=None, help="kill after S seconds")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command and arguments")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise ValueError("no command given: memsafe run --memory 512m -- python job.py")
    try:
        result = run_capped(cmd, args.memory, timeout_s=args.timeout)
    except CgroupCapUnavailable as exc:
        print(f"memsafe run: cannot cap memory here: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    verdict = (
        "OOM-killed" if result.oom_killed else "timed out" if result.timed_out else "completed"
    )
    print(
        f"memsafe run: {verdict} (exit {result.returncode}) in {result.wall_s:.2f}s, "
        f"peak RSS {result.peak_rss_mb:.1f} MB under a {args.memory} cap",
        file=sys.stderr,
    )
    return result.returncode if result.returncode >= 0 else 128 - result.returncode
