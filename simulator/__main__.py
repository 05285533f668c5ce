"""Command line: `python -m simulator (--link PATH | --tcp HOST:PORT) --control-port PORT [...]`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from services.logs import configure_logging

from . import jsonlog
from .device import DEFAULT_CAPACITY, DEFAULT_OWN_NUMBER, DEFAULT_SMSC, Simulator

DESCRIPTION = """\
A GSM modem in PDU mode on a pseudo-terminal (--link), or on a raw TCP port as ser2net serves a modem on another
host (--tcp: one client at a time, a second one is closed at once). It speaks standard AT (27.005/27.007) as
python-gsmmodem-new, Kannel and Gammu expect, and serves a JSON control API on 127.0.0.1. Logs one JSON object per
line on stdout. SIGTERM/SIGINT stop it cleanly (exit 0).
"""

EPILOG = """\
control API (JSON on http://127.0.0.1:PORT):
  POST /sms {"from","text","timestamp"?,"memory"?}  store (SM or ME) + "+CMTI" per part -> {"indices":[...]};
                                           507 when full
  POST /sms/batch {"messages":[...]}       store all, every +CMTI in ONE write (a URC burst)
  GET  /inbox                              SMS still on the SIM
  GET  /outbox                             SMS the client sent (multipart joined)
  GET|POST /state                          signal, battery, registered, fail_sends, cms_error, delivery,
                                           delivery_delay_s, reply_delay_s, send_delay_s; faults: hang, pin,
                                           reject_numbers, reject_cms, block_after, block_cms, ussd,
                                           ussd_encoding, noise, noise_seed, noise_rate, storage, imei, iccid, imsi
  POST /reboot                             the modem restarts (settings lost, boot lines, PIN asked again)
  POST /unplug, POST /replug               remove / recreate the pty at the same link (TCP: stop / start
                                           listening on the same port)
  POST /drop                               TCP mode: cut the client's connection (it may connect again)
  POST /raw {"hex"}                        write raw bytes to the client
  GET  /log                                AT commands received, in order
  GET  /health                             {"ok": true}
See docs/simulator.md for the semantics.
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (exits with status 2 on bad arguments, 0 after --help)."""
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--link", type=Path, help="path of the symlink to the pty slave (the port a modem worker opens)")
    where.add_argument(
        "--tcp",
        type=_tcp_address,
        metavar="HOST:PORT",
        help="serve the modem on this raw TCP port instead (ser2net-like; a worker uses socket://HOST:PORT; "
        "port 0 = any free port, logged at start)",
    )
    parser.add_argument(
        "--control-port",
        required=True,
        type=int,
        help="TCP port of the control API on 127.0.0.1 (0 = any free port, logged at start)",
    )
    parser.add_argument(
        "--own-number",
        default=DEFAULT_OWN_NUMBER,
        help=f"SIM subscriber number answered by AT+CNUM (default {DEFAULT_OWN_NUMBER})",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        default=DEFAULT_CAPACITY,
        help=f"SIM slots in SM (and SR) memory, 1-255 (default {DEFAULT_CAPACITY}); beyond it "
        "injections get 507 / +CMS ERROR: 322",
    )
    parser.add_argument(
        "--smsc", default=DEFAULT_SMSC, help=f"service centre number answered by AT+CSCA? (default {DEFAULT_SMSC})"
    )
    parser.add_argument(
        "--me-capacity",
        type=int,
        default=None,
        help="slots in the modem's own ME memory, 1-255 (default: --capacity)",
    )
    parser.add_argument("--pin", default=None, help="SIM PIN (4-8 digits): the SIM starts locked (AT+CPIN?)")
    parser.add_argument("--imei", default=None, help="IMEI for AT+CGSN (default: derived from --link or --tcp, stable)")
    parser.add_argument(
        "--iccid", default=None, help="ICCID for AT+CCID (default: derived from --link or --tcp, stable)"
    )
    parser.add_argument("--imsi", default=None, help="IMSI for AT+CIMI (default: derived from --link or --tcp, stable)")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="DEBUG also logs every AT command and HTTP request (default INFO)",
    )
    return parser.parse_args(argv)


def _tcp_address(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT). Raises argparse.ArgumentTypeError (argparse prints it, exit 2)."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGTERM/SIGINT; return the exit status."""
    args = parse_args(argv)
    configure_logging(args.log_level.upper(), "simulator")
    if not 1 <= args.capacity <= 255 or not 1 <= (args.me_capacity or args.capacity) <= 255:
        jsonlog.event("bad_arguments", error="capacity must be within 1..255")
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        jsonlog.event("signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        sim = Simulator(
            args.link,
            control_port=args.control_port,
            own_number=args.own_number,
            capacity=args.capacity,
            smsc=args.smsc,
            me_capacity=args.me_capacity,
            pin=args.pin,
            imei=args.imei,
            iccid=args.iccid,
            imsi=args.imsi,
            tcp=args.tcp,
        )
    except ValueError as exc:
        jsonlog.event("bad_arguments", error=str(exc))
        return 2
    try:
        sim.start()
    except OSError as exc:
        jsonlog.event("start_failed", error=str(exc))
        sim.stop()
        return 1
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
