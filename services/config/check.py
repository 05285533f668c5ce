"""``smsgw config check FILE`` (also ``python -m services.config check FILE``): validate a fleet file."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from services.config.fleet import describe_fleet
from services.config.fleet_file import load_fleet_file
from services.config.sources import ConfigError
from services.config.variables import read_var


def main(argv: list[str] | None = None, *, out: Callable[[str], None] = print) -> int:
    """``smsgw config check FILE``: validate a fleet file; exit 0 (valid) or 2 (one line why)."""
    parser = argparse.ArgumentParser(prog="smsgw config", description="Validate a fleet file.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate FILE (default: $SMSGW_CONFIG)")
    check.add_argument("file", nargs="?", default=None)
    args = parser.parse_args(argv)
    try:
        file = args.file if args.file is not None else read_var(os.environ, "SMSGW_CONFIG")
        if not file:
            print("config check: name a file (or set SMSGW_CONFIG)", file=sys.stderr)
            return 2
        fleet = load_fleet_file(file)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    out(f"ok: {file}: {describe_fleet(fleet)}")
    return 0
