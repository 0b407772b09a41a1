"""``memsafe demo``: the main job. Materializes the demo graph headless and prints a report;
``memsafe demo --ui`` serves the demo's runs in the Dagster web UI (no source checkout needed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the demo pipeline headless and report memory and merge figures per asset",
        description=(
            "Materialize the demo (daily orders streamed in chunks, upserted into a warehouse "
            "dataset; CRM exports merged from an inbox) into a persistent Dagster instance, then "
            "print peak RSS, limit and source, pressure, rows and merge counts per asset. "
            "Sizes and places: MEMSAFE_DEMO_* environment variables (see "
            "memsafe_dagster.demo.settings); data under ./.memsafe_data by default."
        ),
    )
    parser.add_argument("--days", type=int, help="daily partitions to run (default: 3)")
    parser.add_argument(
        "--fresh", action="store_true", help="delete the demo's data and history first"
    )
    parser.add_argument(
        "--multiprocess",
        action="store_true",
        help="run each step in its own process, as the web UI and daemon do (slower)",
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only create the data directory and the Dagster home (used by `make ui`)",
    )
    parser.add_argument(
        "--ui",
        action="store_true",
        help="serve the demo's runs, plots and checks in the Dagster web UI (dagster dev)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="web UI host (with --ui)")
    parser.add_argument("--port", type=int, default=3000, help="web UI port (with --ui)")
    parser.set_defaults(handler=run)


WORKSPACE_YAML = """\
# Written by `memsafe demo --ui`: the demo's definitions, as the repository's workspace.yaml
# and `dg dev` (its [tool.dg] project) load them.
load_from:
  - python_module:
      module_name: memsafe_dagster.demo.definitions
      attribute: defs
      location_name: memsafe_demo
"""


def ui_command(workspace: Path, host: str, port: int) -> list[str]:
    """``dagster dev`` on the demo's workspace. A wheel carries no dg project (that is the
    checkout's pyproject.toml, where ``make ui`` runs ``dg dev``), so this is the web UI's own
    command; its advice to use ``dg dev`` is for projects and is silenced."""
    beside = Path(sys.executable).parent / "dagster"
    dagster = str(beside) if beside.exists() else shutil.which("dagster") or "dagster"
    return [dagster, "dev", "-w", str(workspace), "-h", host, "-p", str(port)]


def run(args: argparse.Namespace) -> int:
    from memsafe_dagster.demo.run import ensure_dagster_home, run_demo
    from memsafe_dagster.demo.settings import DemoSettings

    settings = DemoSettings.from_env()
    if args.days is not None and args.days <= 0:
        raise ValueError(f"--days must be a positive integer, got {args.days}")
    if args.prepare or args.ui:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        home = ensure_dagster_home(settings.dagster_home)
        print(f"memsafe demo: data in {settings.data_dir}, Dagster home {home}", flush=True)
        if not args.ui:
            return 0
        workspace = settings.data_dir / "workspace.yaml"
        workspace.write_text(WORKSPACE_YAML)
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "MEMSAFE_DEMO_DATA": str(settings.data_dir),
            "PYTHONWARNINGS": "ignore:Function `dev_command` is superseded:Warning",
        }
        argv = ui_command(workspace, args.host, args.port)
        print(
            f"memsafe demo: web UI on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True
        )
        os.execvpe(argv[0], argv, env)
    report = run_demo(
        settings,
        days=args.days,
        fresh=args.fresh,
        multiprocess=args.multiprocess,
        out=sys.stdout,
    )
    return 0 if report.ok else 1
