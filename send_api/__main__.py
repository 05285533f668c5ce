"""``python -m send_api``: the send API (RapidPro External channel, Kannel sendsms, REST) on SMSGW_API_PORT."""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import urllib.request

from send_api.accept import Acceptor
from send_api.app import build_app
from send_api.limits import QueueDepths, RateLimiter
from send_api.metrics import init_metrics
from send_api.server import ApiServer, bind
from send_api.settings import API_VARS, DEFAULT_METRICS_PORT, ApiSettings, Credentials, Keyring
from send_api.web import ApiContext
from services.broker import PublisherThread
from services.config import ConfigError, FleetConfig, Settings, WorkerEnv
from services.ledger import LedgerError
from services.ledger.api_messages import ApiMessages, open_api_messages
from services.runtime import (
    check,
    heartbeat_path,
    install_stop_signals,
    load_fleet_config,
    load_settings,
    start_liveness,
    start_metrics,
    worker_parser,
)
from services.topology import Topology

log = logging.getLogger(__name__)

# What this worker reads (and lists in --help): the store beside the ledger, its own variables, the fleet.
ENV = WorkerEnv(
    process=("SMSGW_STATE_DIR", "SMSGW_LEDGER_URL", "SMSGW_LEDGER_RETENTION_DAYS", *API_VARS), endpoints=True
)
PRUNE_EVERY_S = 3600.0


def keyring_of(fleet: FleetConfig) -> Keyring:
    """Every endpoint's credentials."""
    return Keyring(Credentials.of(e) for e in fleet.endpoints)


def say_missing_credentials(fleet: FleetConfig) -> None:
    """One WARNING when no endpoint has an api_key or a Kannel login: every request is refused until one has.

    Not a configuration error: compose starts send_api by default, also where no platform uses it yet.
    """
    if not keyring_of(fleet):
        log.warning(
            "send_api: no endpoint in %s has an api_key or a username and password: every request is refused "
            "(401/403) until one has",
            fleet.source,
        )


def open_store(settings: Settings) -> ApiMessages | str:
    """The send-API store, or why it cannot be opened (one line)."""
    try:
        return open_api_messages(settings.ledger_url, settings.state_dir)
    except (OSError, LedgerError) as exc:
        return f"cannot open the send-API message store: {' '.join(str(exc).split())}"


def api_problem(settings: Settings, api: ApiSettings) -> str | None:
    """Why the running API is not healthy (store unreachable, nothing answering on its port), or None."""
    store = open_store(settings)
    if isinstance(store, str):
        return store
    store.close()
    host = "127.0.0.1" if api.addr in ("0.0.0.0", "", "::") else api.addr
    url = f"http://{host}:{api.port}/api/v1/openapi.json"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            if answer.status == 200:
                return None
    except OSError as exc:
        return f"send API not answering on {host}:{api.port}: {exc}"
    return f"send API on {host}:{api.port} answered {answer.status}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2: bad configuration, 1: cannot start)."""
    args = worker_parser(
        "python -m send_api",
        "Accept messages over HTTP (RapidPro External channel POST /rapidpro/<endpoint>, Kannel GET|POST "
        "/cgi-bin/sendsms, REST POST /api/v1/messages) and queue each once for the modem workers, routed by "
        "[[routes]].",
        ENV,
    ).parse_args(argv)
    settings = load_settings("send_api", ENV)
    if settings is None:
        return 2
    try:
        api = ApiSettings.from_env()
    except ConfigError as exc:
        print(f"send_api: configuration error: {exc}", file=sys.stderr)
        return 2
    fleet = load_fleet_config("send_api", ENV, settings)
    if fleet is None:
        return 2
    # Every modem a route names gets its own queue declared: a message restricted to it must find one.
    topology = Topology.of(fleet, sorted({m for route in fleet.routes for m in route.modems}))
    if args.check:
        return check(
            settings,
            topology,
            heartbeat=heartbeat_path(settings, "send_api"),
            worker_problem=lambda: api_problem(settings, api),
        )
    return serve(settings, api, fleet, topology)


def serve(settings: Settings, api: ApiSettings, fleet: FleetConfig, topology: Topology) -> int:
    """Run the API until SIGTERM; returns the exit code."""
    try:
        sock = bind(api.addr, api.port)
    except OSError as exc:
        print(f"unhealthy: send_api: cannot listen on {api.addr}:{api.port}: {exc} (SMSGW_API_PORT)", file=sys.stderr)
        return 1
    store = open_store(settings)
    if isinstance(store, str):
        sock.close()
        print(f"unhealthy: send_api: {store}", file=sys.stderr)
        return 1
    say_missing_credentials(fleet)
    init_metrics(fleet.endpoint_names)
    if settings.metrics_port is None:
        settings = dataclasses.replace(settings, metrics_port=DEFAULT_METRICS_PORT)
    start_metrics(settings, "send_api")
    start_liveness(settings, "send_api")
    publisher = PublisherThread(settings.amqp_url, "smsgw-send-api", topology=topology)
    depths = QueueDepths(settings.amqp_url)
    acceptor = Acceptor(fleet, publisher, store, depths=depths, rate=RateLimiter(api.rate), max_queued=api.max_queued)
    ctx = ApiContext(acceptor, keyring_of(fleet), store, api.max_body)
    server = ApiServer(build_app(ctx), sock)
    stop = threading.Event()
    install_stop_signals(stop.set)
    if not server.start():
        print("unhealthy: send_api: the HTTP server did not start", file=sys.stderr)
        return 1
    log.info("send_api started on %s:%d: %d endpoint(s)", api.addr, server.port, len(fleet.endpoints))
    try:
        _wait(stop, server, depths, store, settings.ledger_retention_days * 86400)
    finally:
        server.drain()
        drained = server.join(60)
        server.close()
        publisher.close()
        depths.close()
        store.close()
    log.info("send_api stopped%s", "" if drained else " (requests still in flight were cut)")
    return 0 if drained else 1


def _wait(stop: threading.Event, server: ApiServer, depths: QueueDepths, store: ApiMessages, keep_s: float) -> None:
    """Until SIGTERM (or the server thread died): keep the depth connection's heartbeats going, prune old
    messages hourly."""
    waited = PRUNE_EVERY_S
    while not stop.wait(5.0) and server.running:
        depths.keep_alive()
        waited += 5.0
        prune = getattr(store, "prune", None)
        if prune is not None and waited >= PRUNE_EVERY_S:
            waited = 0.0
            try:
                prune(keep_s)
            except LedgerError as exc:
                log.warning("send_api: cannot prune old messages (%s); trying again in an hour", exc)


if __name__ == "__main__":
    sys.exit(main())
