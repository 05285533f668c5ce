"""Start and stop the third-party SMSsync peers (shared/protocol-notes.md §3) for integration tests.

Both peers are installed by ``tests/peers/install.sh`` into ``<repo>/.peers/``. Each runner starts its peer as a
subprocess on a free loopback port, waits (polling with a deadline) until it answers, exposes its Sync URL and
what it received, and stops it by PID.

Typical use::

    require_peer("seedphp")          # skips (or fails under CI) when php or the install is missing
    with SeedPhpPeer.start() as peer:
        requests.post(peer.url, data={...})
        peer.received()
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = REPO_ROOT / ".peers"
SEEDPHP_DIR = PEERS_DIR / "seedphp"
LYKMAPIPO_DIR = PEERS_DIR / "lykmapipo"
INSTALL_HINT = "run tests/peers/install.sh"
#: The seed PHP sample is cut out of the seed docs, which live in a shared/ folder next to the clone (not in it).
SEED_DOCS = REPO_ROOT.parent / "shared" / "seed" / "smssync-docs.txt"

#: Hard-coded in the seed PHP sample.
SEEDPHP_SECRET = "123456"
SEEDPHP_TASK_UUID = "1ba368bd-c467-4374-bf28"

PeerKind = Literal["seedphp", "lykmapipo"]


class PeerError(RuntimeError):
    """A peer could not be started or did not answer in time (the message carries its log tail)."""


class PeerUnavailableError(PeerError):
    """The peer's runtime (php/node) or its installation under .peers/ is missing."""


def missing_reason(kind: PeerKind) -> str | None:
    """Why ``kind`` cannot run here (missing tool or install), or None when it can."""
    if kind == "seedphp":
        installed = (SEEDPHP_DIR / "index.php").is_file()
        # Checked before php: without the seed docs install.sh installs neither the sample nor php, so the
        # missing docs are the real reason (a clone without ../shared).
        if not installed and not SEED_DOCS.is_file():
            return f"no seed PHP sample: the seed docs are not at {SEED_DOCS} (a shared/ folder next to the clone)"
        if shutil.which("php") is None:
            return f"php is not installed ({INSTALL_HINT})"
        if not installed:
            return f"{SEEDPHP_DIR / 'index.php'} is missing ({INSTALL_HINT})"
        return None
    if shutil.which("node") is None:
        return f"node is not installed ({INSTALL_HINT})"
    for needed in ("server.js", "node_modules/smssync/package.json", "node_modules/express/package.json"):
        if not (LYKMAPIPO_DIR / needed).is_file():
            return f"{LYKMAPIPO_DIR / needed} is missing ({INSTALL_HINT})"
    return None


def require_peer(kind: PeerKind) -> None:
    """In a pytest test: skip when the peer cannot run, but fail when env ``CI`` is set (CI must run them).

    Raises:
        pytest.skip.Exception / pytest.fail.Exception: as above.
    """
    import pytest

    reason = missing_reason(kind)
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"peer {kind} unavailable under CI: {reason}")
    pytest.skip(f"peer {kind} unavailable: {reason}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller retries if another process grabs it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Call ``predicate`` until it returns True or ``timeout`` seconds pass; return its last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@dataclass
class PeerProcess:
    """A running peer: its subprocess, port, working directory and log file."""

    name: str
    process: subprocess.Popen[bytes]
    host: str
    port: int
    workdir: Path
    log_path: Path
    _cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The subprocess's PID."""
        return self.process.pid

    @property
    def base_url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def log_text(self) -> str:
        """Everything the peer wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        """True while the subprocess runs."""
        return self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the peer by PID (SIGTERM, then SIGKILL after ``timeout``) and run cleanups; idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        while self._cleanup:
            self._cleanup.pop()()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _spawn(
    name: str,
    argv_for_port: Callable[[int], list[str]],
    cwd: Path,
    log_path: Path,
    ready_path: str,
    timeout: float,
    host: str = "127.0.0.1",
    attempts: int = 3,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``argv_for_port(port)`` on a free port and wait until ``GET ready_path`` answers.

    A process that exits before answering (usually: the port was taken in between) is retried on a new port.

    Raises:
        PeerError: no attempt answered within ``timeout`` seconds (log tail included).
    """
    last_error = ""
    for _ in range(attempts):
        port = free_port(host)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                argv_for_port(port), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

        def answers(port: int = port, process: subprocess.Popen[bytes] = process) -> bool:
            if process.poll() is not None:
                return True  # stop waiting; checked below
            try:
                requests.get(f"http://{host}:{port}{ready_path}", timeout=0.5)
            except requests.RequestException:
                return False
            return True

        wait_until(answers, timeout)
        if process.poll() is None and answers():
            return process, port
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
            last_error = f"did not answer within {timeout} s"
            break
        last_error = f"exited with status {process.returncode}"
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
    raise PeerError(f"{name} {last_error}; log tail:\n{tail}")


# --- seed PHP sample -----------------------------------------------------------------------------------------


@dataclass
class SeedPhpLog:
    """What the seed PHP sample appended to its ``test.txt``."""

    messages: list[dict[str, str]]
    #: Raw bodies of ``POST ?task=sent`` requests.
    sent_bodies: list[str]
    #: Raw bodies of ``POST ?task=result&secret=123456`` requests.
    result_bodies: list[str]


_SEED_FIELDS = (
    ("From: ", "from"),
    ("Message: ", "message"),
    ("Timestamp: ", "sent_timestamp"),
    ("Messages Id:", "message_id"),
    ("Sent to: ", "sent_to"),
    ("Device ID: ", "device_id"),
)


def parse_seedphp_log(text: str) -> SeedPhpLog:
    """Parse the sample's ``test.txt``.

    SMS blocks are ``From: …`` … ``Device ID: …`` lines (a message body may span lines); lines starting with
    ``message `` are delivery-result bodies; any other non-empty line is a ``task=sent`` body.
    """
    log = SeedPhpLog(messages=[], sent_bodies=[], result_bodies=[])
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("From: "):
            record: dict[str, str] = {}
            field_index = 0
            current_key = ""
            while index < len(lines) and field_index < len(_SEED_FIELDS):
                line = lines[index]
                prefix, key = _SEED_FIELDS[field_index]
                if line.startswith(prefix):
                    record[key] = line[len(prefix) :]
                    current_key = key
                    field_index += 1
                elif current_key == "message":
                    # A multi-line SMS body continues until the Timestamp line.
                    record["message"] += "\n" + line
                else:
                    break
                index += 1
            log.messages.append(record)
            continue
        if line.startswith("message "):
            log.result_bodies.append(line[len("message ") :])
        elif line.strip():
            log.sent_bodies.append(line)
        index += 1
    return log


@dataclass
class SeedPhpPeer(PeerProcess):
    """The seed docs' PHP sample under ``php -S``, in its own copy of ``.peers/seedphp``."""

    secret: str = SEEDPHP_SECRET

    @classmethod
    def start(cls, *, display_errors: bool = False, host: str = "127.0.0.1", timeout: float = 10.0) -> SeedPhpPeer:
        """Copy the sample to a fresh temp dir and serve it; return once it answers.

        ``display_errors=True`` makes PHP prepend HTML warnings to bodies ("garbage before JSON").

        Raises:
            PeerUnavailableError: php or the installed sample is missing.
            PeerError: it did not start.
        """
        reason = missing_reason("seedphp")
        if reason is not None:
            raise PeerUnavailableError(reason)
        # Each run gets its own dir, so test.txt starts empty and parallel runs don't share it.
        workdir = Path(tempfile.mkdtemp(prefix="seedphp-"))
        shutil.copy2(SEEDPHP_DIR / "index.php", workdir / "index.php")
        log_path = workdir / "server.log"

        def argv(port: int) -> list[str]:
            return [
                "php",
                "-d",
                f"display_errors={1 if display_errors else 0}",
                "-S",
                f"{host}:{port}",
                "-t",
                str(workdir),
            ]

        try:
            # GET on the sample only answers JSON; it writes nothing to test.txt.
            process, port = _spawn("seed PHP peer", argv, workdir, log_path, "/index.php", timeout, host)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        peer = cls(name="seedphp", process=process, host=host, port=port, workdir=workdir, log_path=log_path)
        peer._cleanup.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
        return peer

    @property
    def url(self) -> str:
        """The Sync URL (the sample is ``index.php``)."""
        return f"{self.base_url}/index.php"

    @property
    def test_txt(self) -> Path:
        """The sample's log file (absent until it logs something)."""
        return self.workdir / "test.txt"

    def log(self) -> SeedPhpLog:
        """Everything the sample logged so far, parsed."""
        try:
            text = self.test_txt.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        return parse_seedphp_log(text)

    def received(self) -> list[dict[str, str]]:
        """SMS the sample logged (it logs them whatever the secret)."""
        return self.log().messages


# --- npm smssync (lykmapipo) -----------------------------------------------------------------------------


@dataclass
class LykmapipoPeer(PeerProcess):
    """npm ``smssync`` 0.3.28 under the host app ``server.js`` (protocol-notes §3.2)."""

    secret: str = "s3cret"

    @classmethod
    def start(cls, secret: str = "s3cret", *, host: str = "127.0.0.1", timeout: float = 15.0) -> LykmapipoPeer:
        """Run ``node server.js PORT SECRET`` from ``.peers/lykmapipo``; return once ``/_state`` answers.

        State is in memory, so runs can share the install dir; only the log file is per run.

        Raises:
            PeerUnavailableError: node or the npm install is missing.
            PeerError: it did not start.
        """
        reason = missing_reason("lykmapipo")
        if reason is not None:
            raise PeerUnavailableError(reason)
        if host != "127.0.0.1":
            raise ValueError("server.js listens on 127.0.0.1 only")
        logdir = Path(tempfile.mkdtemp(prefix="lykmapipo-"))
        log_path = logdir / "server.log"

        def argv(port: int) -> list[str]:
            return ["node", str(LYKMAPIPO_DIR / "server.js"), str(port), secret]

        try:
            process, port = _spawn("lykmapipo peer", argv, LYKMAPIPO_DIR, log_path, "/_state", timeout, host)
        except BaseException:
            shutil.rmtree(logdir, ignore_errors=True)
            raise
        peer = cls(
            name="lykmapipo",
            process=process,
            host=host,
            port=port,
            workdir=LYKMAPIPO_DIR,
            log_path=log_path,
            secret=secret,
        )
        peer._cleanup.append(lambda: shutil.rmtree(logdir, ignore_errors=True))
        return peer

    @property
    def url(self) -> str:
        """The Sync URL (a trailing slash also works)."""
        return f"{self.base_url}/smssync"

    def state(self) -> dict[str, Any]:
        """``GET /_state``: received, outbox, queued, sent_requests, delivered.

        Raises:
            requests.RequestException / ValueError: the peer did not answer JSON.
        """
        response = requests.get(f"{self.base_url}/_state", timeout=5)
        response.raise_for_status()
        document = json.loads(response.text)
        if not isinstance(document, dict):
            raise ValueError("/_state is not a JSON object")
        return document

    def received(self) -> list[dict[str, Any]]:
        """SMS handed to ``onReceive`` (only the docs' fields plus the router's ``hash``)."""
        received = self.state()["received"]
        assert isinstance(received, list)
        return received
