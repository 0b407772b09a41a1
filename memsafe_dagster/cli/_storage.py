"""``--storage-option KEY=VALUE``: fsspec storage options from the command line.

Repeatable. A dotted key nests (``client_kwargs.endpoint_url=http://...``); a value that parses
as JSON (``true``, ``5``, ``{"a": 1}``) is taken as such, anything else as a string.
Credentials belong in the environment (``AWS_ACCESS_KEY_ID`` ...), not on the command line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_storage_option_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for every URL (repeatable; dotted keys nest)",
    )


def parse_storage_options(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; ValueError on a bad item."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option {item!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        node = options
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return options


def storage_options_or_exit(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--storage-option`` items of ``args`` as storage options. A bad item raises
    ValueError, which ``memsafe`` reports as ``memsafe <command>: error: ...`` with exit
    status 2 (``cli.main``), before anything is opened."""
    return parse_storage_options(list(getattr(args, "storage_option", None) or []))
