"""The demo: the whole gateway on this machine, a simulated modem and the reference Sync server.

    scripts/demo [--duration SECONDS] [--check]

Starts, on the local RabbitMQ (vhost ``smsgw-demo``): the reference Sync server (http://127.0.0.1:8700/),
a modem simulator (control API http://127.0.0.1:8801), modem_worker, sync_worker, task_poller and
result_reporter. It then texts the gateway a few SMS and queues two outgoing SMS on the server, and prints what
happens. ``--check`` exits 0 only if every SMS made the whole round trip (used by the tests).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from scripts.stack import ROOT, Stack, delete_vhost, ensure_vhost, free_port, http_json, wait_until

DEMO_VHOST = "smsgw-demo"
SECRET = "demo secret&=1"
SAMPLE_SMS = [
    ("+255700000101", "Hello from the field clinic"),
    ("+255700000102", "Habari! Dawa zimefika salama."),
    ("+34600000103", "¿Llegó el envío? Gracias."),
    ("+8613800000104", "你好，收到了吗？"),
    ("+255700000105", "Stock report 😀 " + "long text " * 30),
]


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0 = Ctrl-C)")
    parser.add_argument("--check", action="store_true", help="verify the round trip, then exit 0/1")
    parser.add_argument("--vhost", default=DEMO_VHOST, help="RabbitMQ vhost to use (created, removed at exit)")
    parser.add_argument("--server-port", type=int, default=8700)
    parser.add_argument("--simulator-port", type=int, default=8801)
    args = parser.parse_args(argv)
    if args.check:
        args.server_port, args.simulator_port = free_port(), free_port()

    workdir = ROOT / "var" / f"demo-{args.vhost}"  # var/ is git-ignored
    shutil.rmtree(workdir, ignore_errors=True)
    amqp_url = ensure_vhost(args.vhost)
    sync_url = f"http://127.0.0.1:{args.server_port}/smssync"
    stack = Stack(workdir, amqp_url, sync_url, SECRET, env={
        "SMSGW_DEVICE_ID": "demo-gateway",
        "SMSGW_TASK_INTERVAL": "3",
        "SMSGW_RESULT_INTERVAL": "3",
        "SMSGW_MESSAGE_RESULTS": "true",
        "SMSGW_AUTO_RESPONSE": "",
    })
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        stack.start("reference_server", "reference_server", "--port", str(args.server_port), "--reply",
                    env={"SMSSYNC_REFERENCE_SECRET": SECRET})
        wait_until(lambda: http_json(f"http://127.0.0.1:{args.server_port}/_state"), 20, "reference server")
        simulator = stack.start_simulator("simulator", "+255754000001", args.simulator_port)
        stack.start_modem_worker("modem_worker", simulator, "demo-modem")
        stack.start("sync_worker", "sync_worker")
        stack.start("task_poller", "task_poller")
        stack.start("result_reporter", "result_reporter")
        print(f"""
smssync-gateway demo is running
  reference Sync server : http://127.0.0.1:{args.server_port}/   (what the server received and sent)
  modem simulator       : {simulator.control_url}/inbox, /outbox, POST /sms
  RabbitMQ vhost        : {args.vhost}
  logs                  : {workdir / 'logs'}
""", flush=True)
        for sender, text in SAMPLE_SMS:
            simulator.inject(sender, text)
        http_json(f"http://127.0.0.1:{args.server_port}/_outgoing", {"messages": [
            {"to": "+255700000201", "message": "Reminder: clinic opens at 8am"},
            {"to": "+255700000202", "message": "Kumbusho: kliniki inafunguliwa saa 2 asubuhi 🏥"},
        ]})
        ok = _watch(stack, args, stopping, simulator)
        return 0 if ok or not args.check else 1
    finally:
        stack.stop_all()
        delete_vhost(args.vhost)


def _watch(stack: Stack, args: argparse.Namespace, stopping: threading.Event, simulator: Any) -> bool:
    """Print progress; with --check, return whether the full round trip happened within the deadline."""
    deadline = time.monotonic() + (args.duration or (120 if args.check else float("inf")))
    server = f"http://127.0.0.1:{args.server_port}"
    last = ""
    while not stopping.is_set() and time.monotonic() < deadline:
        state = http_json(f"{server}/_state")
        received = len(state.get("received", []))
        outgoing = state.get("outgoing", [])
        statuses: dict[str, int] = {}
        for item in outgoing:
            statuses[item.get("status", "?")] = statuses.get(item.get("status", "?"), 0) + 1
        sent_by_modem = len(simulator.outbox())
        line = (f"server received {received}/{len(SAMPLE_SMS)} SMS | outgoing {statuses} | "
                f"modem sent {sent_by_modem} SMS | SIM holds {len(simulator.inbox())}")
        if line != last:
            print(line, flush=True)
            last = line
        done = (received == len(SAMPLE_SMS) and sent_by_modem >= len(SAMPLE_SMS) + 2
                and len(outgoing) == len(SAMPLE_SMS) + 2
                and all(item.get("status") == "delivered" for item in outgoing))
        if args.check and done:
            print("demo check: every SMS made the round trip", flush=True)
            return True
        stopping.wait(1.0)
    if args.check:
        print("demo check FAILED; see the logs in", stack.workdir / "logs", flush=True)
    return False


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
