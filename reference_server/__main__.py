"""CLI: ``python -m reference_server --port 8700 --secret S [--path /smssync] [--reply] [--host 127.0.0.1]
[--signing-key K]``.

Logs JSON lines to stdout (services/logs.py). The secret and the signing key are never logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

from reference_server.server import ReferenceServer
from services.logs import configure_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (and the two environment variables), checked; exits 2 without a secret."""
    parser = argparse.ArgumentParser(
        prog="python -m reference_server",
        description="Reference SMSsync Sync server (in-memory; operator page on GET /).",
    )
    parser.add_argument("--port", type=int, default=8700, help="TCP port (default 8700; 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument(
        "--secret",
        default=os.environ.get("SMSSYNC_REFERENCE_SECRET"),
        help="shared secret (or env SMSSYNC_REFERENCE_SECRET; prefer the env var: argv is visible in ps)",
    )
    parser.add_argument(
        "--signing-key",
        default=os.environ.get("SMSSYNC_REFERENCE_SIGNING_KEY", ""),
        help="verify X-SMSGW-Signature on every Sync request with this key, 401 otherwise (docs/signing.md; "
        "or env SMSSYNC_REFERENCE_SIGNING_KEY, preferred: argv is visible in ps; default: not checked)",
    )
    parser.add_argument("--path", default="/smssync", help="Sync URL path (default /smssync)")
    parser.add_argument("--reply", action="store_true", help="answer each new SMS with an instant reply SMS")
    parser.add_argument(
        "--delivered-ok-code",
        type=int,
        default=0,
        help="delivered_result_code meaning 'delivered' (0 as in the docs; -1 for the Android app)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    if args.secret is None:
        parser.error("--secret is required (or set SMSSYNC_REFERENCE_SECRET)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; returns the process exit code."""
    args = parse_args(argv)
    configure_logging(args.log_level.upper(), "reference_server")
    server = ReferenceServer(
        args.secret,
        port=args.port,
        path=args.path,
        reply=args.reply,
        host=args.host,
        delivered_ok_code=args.delivered_ok_code,
        signing_key=args.signing_key,
    )

    def _terminate(signum: int, frame: FrameType | None) -> None:
        # serve_forever() runs in this thread, so unwind it with KeyboardInterrupt like Ctrl-C does.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logging.getLogger("reference_server").info("reference server stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
