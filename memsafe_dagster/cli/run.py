"""``memsafe run --limit 512m -- CMD``: run a command under a real cgroup memory cap."""

from __future__ import annotations

import argparse
import sys

from memsafe_dagster.cli._monitor_options import SIZE_HELP, add_size_option
from memsafe_dagster.memory.cgroup_cap import CgroupCapUnavailable, run_capped


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a command under a real memory cap (a child cgroup), report its peak",
    )
    add_size_option(parser, "--limit", f"the cap the command runs under ({SIZE_HELP})", "--memory")
    parser.add_argument("--timeout", type=float, default=None, help="kill after S seconds")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command and arguments")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise ValueError("no command given: memsafe run --limit 512m -- python job.py")
    if args.limit is None:
        raise ValueError("--limit SIZE is required: memsafe run --limit 512m -- python job.py")
    cap_bytes = int(args.limit * 2**20)
    try:
        result = run_capped(cmd, cap_bytes, timeout_s=args.timeout)
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
        f"peak RSS {result.peak_rss_mb:.1f} MB under a {args.limit:.0f} MB cap",
        file=sys.stderr,
    )
    return result.returncode if result.returncode >= 0 else 128 - result.returncode
