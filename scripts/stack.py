"""Start the whole gateway as real processes: simulators (on a pty, or on a TCP port like a modem behind ser2net),
modem workers, sync worker, task poller, reporter.

Used by the demo (``scripts/demo``), the end-to-end tests and the benchmark, so all three run the very same
commands an operator runs. Every process is started and stopped by its PID; logs go to ``<workdir>/logs``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_json(url: str, payload: Any | None = None, timeout: float = 10.0) -> Any:
    """GET (or POST ``payload`` as JSON) and decode the JSON answer."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (OSError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def ensure_vhost(vhost: str) -> str:
    """Create ``vhost`` (guest has full rights) and return its AMQP URL."""
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], capture_output=True, timeout=60, check=False)
    subprocess.run(
        ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return f"amqp://guest:guest@127.0.0.1:5672/{urllib.parse.quote(vhost, safe='')}"


def delete_vhost(vhost: str) -> None:
    """Remove a vhost and everything in it."""
    subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60, check=False)


@dataclass
class Process:
    """One started process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    popen: subprocess.Popen[bytes]
    log_file: TextIO

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Simulator:
    """A running simulator: where its device is (a pty link, or with ``tcp_url`` a TCP port) and how to reach its
    control API."""

    link: Path | None
    control_url: str
    own_number: str
    tcp_url: str | None = None  # socket://127.0.0.1:P of a simulator in TCP mode (then link is None)

    @property
    def port(self) -> str:
        """What a modem worker's SMSGW_MODEM_PORT names: the link path, or the ``socket://`` URL."""
        return self.tcp_url or str(self.link)

    def health(self) -> dict[str, Any]:
        """``GET /health``: plugged, and in TCP mode whether a client (the worker) is connected."""
        return dict(http_json(f"{self.control_url}/health"))

    def drop(self) -> bool:
        """TCP mode: cut the worker's connection (``POST /drop``); True when one was connected."""
        return bool(http_json(f"{self.control_url}/drop", {})["dropped"])

    def unplug(self) -> None:
        """``POST /unplug`` (TCP mode: stop listening; connections are refused)."""
        http_json(f"{self.control_url}/unplug", {})

    def replug(self) -> None:
        """``POST /replug`` (TCP mode: listen again on the same port)."""
        http_json(f"{self.control_url}/replug", {})

    def inject(self, sender: str, text: str, timestamp_ms: int | None = None) -> Any:
        payload: dict[str, Any] = {"from": sender, "text": text}
        if timestamp_ms is not None:
            payload["timestamp"] = timestamp_ms
        return http_json(f"{self.control_url}/sms", payload)

    def outbox(self) -> list[dict[str, Any]]:
        return list(http_json(f"{self.control_url}/outbox"))

    def inbox(self) -> list[dict[str, Any]]:
        return list(http_json(f"{self.control_url}/inbox"))

    def set_state(self, **state: Any) -> Any:
        return http_json(f"{self.control_url}/state", state)


@dataclass
class ReferenceServerProcess:
    """A reference server running as its own process (``python -m reference_server``), driven over HTTP."""

    base_url: str
    path: str = "/smssync"

    @property
    def url(self) -> str:
        """The Sync URL to configure on the gateway."""
        return self.base_url + self.path

    def state(self) -> dict[str, Any]:
        """The ``GET /_state`` document: received, outgoing, counters, config."""
        return dict(http_json(f"{self.base_url}/_state"))

    def received(self) -> list[dict[str, Any]]:
        """Inbound SMS received so far (each message_id once, with its ``repeats``)."""
        return list(self.state()["received"])

    def outgoing(self) -> list[dict[str, Any]]:
        """Outgoing SMS with status and result rows."""
        return list(self.state()["outgoing"])

    def queue(self, messages: list[dict[str, str]]) -> list[str]:
        """Queue outgoing SMS (``{"to", "message", "uuid"?}`` each) for ``?task=send``; returns their uuids."""
        return list(http_json(f"{self.base_url}/_outgoing", {"messages": messages})["queued"])

    def configure(self, **settings: Any) -> Any:
        """``POST /_config`` (fail_status, fail_count, reply, secret, ...)."""
        return http_json(f"{self.base_url}/_config", settings)

    def wait_ready(self, timeout: float = 20.0) -> ReferenceServerProcess:
        """Wait until the server answers ``/_state``; returns self. Raises TimeoutError."""
        wait_until(self.state, timeout, f"reference server at {self.base_url}")
        return self


@dataclass
class Stack:
    """Processes of one gateway installation, sharing a work directory and an AMQP URL."""

    workdir: Path
    amqp_url: str
    sync_url: str = ""
    secret: str = ""
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, Process] = field(default_factory=dict)
    simulators: dict[str, Simulator] = field(default_factory=dict)
    # True: each process gets its own session, so a Ctrl-C on the terminal reaches only the parent (the demo),
    # which then sends each child exactly one SIGTERM (stop_all) instead of the terminal's SIGINT plus that
    # SIGTERM, which a worker counts as the second signal (exit at once, no drain).
    own_session: bool = False

    def __post_init__(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMSGW_")}
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "PYTHONUNBUFFERED": "1",
                "SMSGW_AMQP_URL": self.amqp_url,
                "SMSGW_SYNC_URL": self.sync_url,
                "SMSGW_SECRET": self.secret,
                "SMSGW_STATE_DIR": str(self.workdir / "state"),
                "SMSGW_METRICS_PORT": "0",
            }
        )
        env.update(self.env)
        return env

    def write_config(self, toml_text: str, name: str = "fleet.toml") -> Path:
        """Write a fleet file (``SMSGW_CONFIG``) into the work directory; every process started afterwards
        reads it. Returns its path."""
        path = self.workdir / name
        path.write_text(toml_text, encoding="utf-8")
        self.env["SMSGW_CONFIG"] = str(path)
        return path

    def start(self, name: str, module: str, *args: str, env: dict[str, str] | None = None) -> Process:
        """Start ``python -m module args`` with the stack's environment plus ``env``."""
        return self._spawn(name, [sys.executable, "-m", module, *args], {**self.base_env(), **(env or {})})

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Process:
        log_file = (self.workdir / "logs" / f"{name}.log").open("a", encoding="utf-8")
        popen = subprocess.Popen(
            argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=self.own_session
        )
        process = Process(name, argv, env, popen, log_file)
        self.processes[name] = process
        return process

    def start_simulator(
        self, name: str, own_number: str, control_port: int | None = None, *extra_args: str
    ) -> Simulator:
        """Start a modem simulator (``extra_args`` go to its command line) and wait for its control API."""
        link = self.workdir / f"{name}.tty"
        # A port free_port() found may be taken by another process before the simulator binds it (seen in CI:
        # "Address already in use"); a simulator that exits at start is started again on a new port.
        for attempt in range(3):
            port = control_port or free_port()
            process = self.start(
                name,
                "simulator",
                "--link",
                str(link),
                "--control-port",
                str(port),
                "--own-number",
                own_number,
                *extra_args,
            )
            simulator = Simulator(link, f"http://127.0.0.1:{port}", own_number)
            started = wait_until(
                lambda process=process, simulator=simulator: (
                    process.popen.poll() is not None
                    or bool(http_json(f"{simulator.control_url}/health") and link.exists())
                ),
                20,
                f"simulator {name}",
            )
            if started and process.popen.poll() is None:
                break
            process.log_file.close()
            if control_port is not None or attempt == 2:
                raise RuntimeError(f"simulator {name} exited at start (see {self.workdir / 'logs' / name}.log)")
        self.simulators[name] = simulator
        return simulator

    def start_tcp_simulator(self, name: str, own_number: str, *extra_args: str) -> Simulator:
        """Start a modem simulator in TCP mode (``--tcp 127.0.0.1:P``, ser2net-like: a worker uses
        ``SMSGW_MODEM_PORT=socket://127.0.0.1:P``) and wait for its control API; ``extra_args`` go to its command
        line. Raises RuntimeError when it does not start (three tries, as a free port may be taken meanwhile)."""
        for _attempt in range(3):
            control_port, tcp_port = free_port(), free_port()
            process = self.start(
                name,
                "simulator",
                "--tcp",
                f"127.0.0.1:{tcp_port}",
                "--control-port",
                str(control_port),
                "--own-number",
                own_number,
                *extra_args,
            )
            simulator = Simulator(
                None, f"http://127.0.0.1:{control_port}", own_number, f"socket://127.0.0.1:{tcp_port}"
            )
            wait_until(
                lambda process=process, simulator=simulator: (
                    process.popen.poll() is not None or bool(simulator.health()["plugged"])
                ),
                20,
                f"simulator {name}",
            )
            if process.popen.poll() is None:
                self.simulators[name] = simulator
                return simulator
            process.log_file.close()
        raise RuntimeError(f"simulator {name} exited at start (see {self.workdir / 'logs' / name}.log)")

    def start_modem_worker(
        self, name: str, simulator: Simulator, modem_id: str, env: dict[str, str] | None = None
    ) -> Process:
        return self.start(
            name,
            "modem_worker",
            env={"SMSGW_MODEM_PORT": simulator.port, "SMSGW_MODEM_ID": modem_id, **(env or {})},
        )

    def start_reference_server(
        self, name: str, secret: str, port: int | None = None, *extra_args: str
    ) -> ReferenceServerProcess:
        """Start ``python -m reference_server`` on ``port`` (default: a free one; ``restart(name)`` brings it back
        on the same port) and wait until it answers. The secret goes in the environment, not in argv."""
        port = port or free_port()
        self.start(name, "reference_server", "--port", str(port), *extra_args, env={"SMSSYNC_REFERENCE_SECRET": secret})
        return ReferenceServerProcess(f"http://127.0.0.1:{port}").wait_ready()

    def restart(self, name: str) -> Process:
        """Start a stopped process again with the same command and environment."""
        old = self.processes[name]
        old.log_file.close()
        return self._spawn(name, old.argv, old.env)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one process (by PID) and reap it."""
        process = self.processes[name]
        if process.popen.poll() is None:
            os.kill(process.pid, sig)
        process.popen.wait(timeout=60)

    def stop_all(self, timeout: float = 20.0) -> None:
        """SIGTERM the workers and wait (they drain), then the simulators; SIGKILL what outlives ``timeout``."""
        is_simulator = [p for p in self.processes.values() if p.argv[2] == "simulator"]
        workers = [p for p in self.processes.values() if p not in is_simulator]
        for group in (workers, is_simulator):
            for process in group:
                if process.popen.poll() is None:
                    os.kill(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for process in group:
                try:
                    process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.popen.wait(timeout=10)
                process.log_file.close()

    def log_text(self, name: str) -> str:
        return (self.workdir / "logs" / f"{name}.log").read_text(encoding="utf-8", errors="replace")
