"""The one Sync URL client (services/sync_client.py) against loopback HTTP servers, and request signing against
the verification recipes of docs/signing.md in Python, PHP and Node."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from services.config import EndpointConfig, fleet_from_env
from services.sync_client import (
    AnswerTooSlow,
    RedirectRefused,
    SyncAnswer,
    SyncClient,
    redirect_target,
)
from services.sync_protocol import USER_AGENT
from tests.conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "signing.md"
KEY = "k3y-for-signing"
OK_BODY = '{"payload":{"success":true}}'


# --- a recording loopback server --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request as it arrived: the request target exactly as on the request line, headers, raw body."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


Answer = tuple[int, dict[str, str], str]


@dataclass
class Recorder:
    """Loopback HTTP server recording every request; ``respond`` decides (status, headers, body)."""

    respond: Callable[[Seen], Answer] = lambda _seen: (200, {}, OK_BODY)
    seen: list[Seen] = field(default_factory=list)

    def start(self) -> Recorder:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                recorder.seen.append(seen)
                status, headers, text = recorder.respond(seen)
                data = text.encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _handle  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/smssync"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder().start()
    yield server
    server.stop()


def endpoint(sync_url: str, *, signing_key: str = "", http_timeout: float = 5) -> EndpointConfig:
    """An endpoint as the env-only fleet builds it, with ``sync_url``, ``signing_key`` and ``http_timeout``."""
    base = fleet_from_env({"SMSGW_SYNC_URL": sync_url}).endpoints[0]
    return dataclasses.replace(base, signing_key=signing_key, http_timeout=http_timeout)


@pytest.fixture
def client_for() -> Iterator[Callable[..., SyncClient]]:
    clients: list[SyncClient] = []

    def make(sync_url: str, **options: Any) -> SyncClient:
        client = SyncClient(endpoint(sync_url, **options))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def every_leg(client: SyncClient) -> list[SyncAnswer]:
    """One request of each leg: task poll, ?task=sent, inbound sync (PUT, form body), probe."""
    return [
        client.get(task="send", secret="s&cret é"),
        client.post_json({"queued_messages": ["u1", "u2"]}, task="sent"),
        client.send("PUT", b"secret=s&from=%2B255700000001&message=h%C3%A9llo", "application/x-www-form-urlencoded"),
        client.probe(),
    ]


# --- deadline, redirects, auth ----------------------------------------------------------------------------------

LEGS: dict[str, Callable[[SyncClient], SyncAnswer]] = {
    "get": lambda c: c.get(task="send"),
    "post_json": lambda c: c.post_json({"queued_messages": []}, task="sent"),
    "send": lambda c: c.send("POST", b"message=x", "application/x-www-form-urlencoded"),
    "probe": lambda c: c.probe(),
}


@pytest.mark.parametrize("leg", sorted(LEGS))
def test_every_leg_gives_up_on_a_trickling_body_at_the_deadline(
    leg: str, client_for: Callable[..., SyncClient]
) -> None:
    stop = threading.Event()

    class Trickle(BaseHTTPRequestHandler):
        def _trickle(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            while not stop.is_set():  # a byte every 0.2 s: each read is within the socket time-out
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return
                stop.wait(0.2)

        do_GET = do_POST = _trickle  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = client_for(f"http://127.0.0.1:{server.server_address[1]}/smssync", http_timeout=1)
        started = time.monotonic()
        with pytest.raises(AnswerTooSlow, match="not complete within 1s"):
            LEGS[leg](client)
        assert time.monotonic() - started < 2.5
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_same_host_redirect_is_resent_with_the_same_method_and_body(
    status: int, recorder: Recorder, client_for: Callable[..., SyncClient]
) -> None:
    recorder.respond = lambda s: (
        (status, {"Location": "/v2/smssync"}, "") if s.target == "/smssync" else (200, {}, OK_BODY)
    )
    client = client_for(recorder.url)
    answer = client.send("PUT", b'{"message":"hi"}', "application/json")
    assert answer == SyncAnswer(200, OK_BODY)
    first, second = recorder.seen
    assert (second.method, second.target, second.body) == ("PUT", "/v2/smssync", b'{"message":"hi"}')
    assert second.headers["content-type"] == "application/json" == first.headers["content-type"]


def test_post_json_follows_a_same_host_redirect_as_a_post(
    recorder: Recorder, client_for: Callable[..., SyncClient]
) -> None:
    recorder.respond = lambda s: (
        (302, {"Location": "/final?task=sent"}, "") if s.target.startswith("/smssync") else (200, {}, "{}")
    )
    assert client_for(recorder.url).post_json({"queued_messages": ["a"]}, task="sent") == SyncAnswer(200, "{}")
    assert [(s.method, s.target) for s in recorder.seen] == [
        ("POST", "/smssync?task=sent"),
        ("POST", "/final?task=sent"),
    ]
    assert recorder.seen[1].body == b'{"queued_messages": ["a"]}'


def test_redirect_to_another_host_is_refused_and_nothing_is_sent_there(
    recorder: Recorder, client_for: Callable[..., SyncClient]
) -> None:
    elsewhere = Recorder().start()
    try:
        recorder.respond = lambda _s: (302, {"Location": elsewhere.url.replace("127.0.0.1", "localhost")}, "")
        client = client_for(recorder.url)
        with pytest.raises(RedirectRefused, match="redirects to another host"):
            client.send("POST", b"secret=s&message=x", "application/x-www-form-urlencoded")
        # get/post_json return the 3xx they were not allowed to follow; their callers report it as a status.
        assert client.get(task="send", secret="s").status == 302
        assert client.post_json({}, task="sent").status == 302
        assert elsewhere.seen == [] and len(recorder.seen) == 3
    finally:
        elsewhere.stop()


def test_redirect_loops_and_a_missing_location_are_refused(
    recorder: Recorder, client_for: Callable[..., SyncClient]
) -> None:
    client = client_for(recorder.url)
    recorder.respond = lambda _s: (307, {"Location": "/smssync"}, "")
    with pytest.raises(RedirectRefused, match="redirected more than 3 times"):
        client.send("POST", b"x", "text/plain")
    assert len(recorder.seen) == 4
    recorder.respond = lambda _s: (302, {}, "")
    with pytest.raises(RedirectRefused, match="without a Location"):
        client.send("POST", b"x", "text/plain")


@pytest.mark.parametrize(
    ("url", "location", "followed"),
    [
        ("http://a.example/smssync", "/smssync/", "http://a.example/smssync/"),
        ("http://a.example/smssync", "https://a.example/smssync", "https://a.example/smssync"),
        ("https://a.example/smssync", "http://a.example/smssync", None),
        ("https://a.example/smssync", "https://b.example/smssync", None),
        ("https://a.example/smssync", "https://a.example:8443/smssync", None),
        ("https://a.example/smssync", "http://[::1", None),
    ],
)
def test_redirects_are_followed_only_on_the_same_host(url: str, location: str, followed: str | None) -> None:
    if followed is None:
        with pytest.raises(RedirectRefused):
            redirect_target(url, location)
    else:
        assert redirect_target(url, location) == followed


def test_an_unreadable_location_is_a_refused_redirect_on_every_leg(
    recorder: Recorder, client_for: Callable[..., SyncClient]
) -> None:
    # requests itself parsed every Location (even with allow_redirects=False) and raised a bare ValueError.
    recorder.respond = lambda _s: (302, {"Location": "http://[::1"}, "")
    client = client_for(recorder.url)
    with pytest.raises(RedirectRefused, match=r"unreadable Location 'http://\[::1'") as refused:
        client.send("POST", b"x", "text/plain")
    assert refused.value.answer is not None and refused.value.answer.status == 302
    # The task legs and the probe report it as the status it is.
    assert [LEGS[leg](client).status for leg in ("get", "post_json", "probe")] == [302, 302, 302]
    assert len(recorder.seen) == 4, "nothing followed"


def test_probe_does_not_follow_redirects(recorder: Recorder, client_for: Callable[..., SyncClient]) -> None:
    recorder.respond = lambda _s: (302, {"Location": "/elsewhere"}, "")
    assert client_for(recorder.url).probe().status == 302
    assert [s.target for s in recorder.seen] == ["/smssync"]


def test_basic_auth_and_user_agent_on_every_leg_and_hop(
    recorder: Recorder, client_for: Callable[..., SyncClient]
) -> None:
    recorder.respond = lambda s: (
        (308, {"Location": "/hop"}, "") if s.method == "PUT" and s.target == "/smssync" else (200, {}, "{}")
    )
    url = recorder.url.replace("http://", "http://us%40er:p%3Ass@")
    client = client_for(url, signing_key=KEY)
    every_leg(client)
    expected = "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    assert len(recorder.seen) == 5  # the PUT was redirected once
    assert all(s.headers.get("authorization") == expected for s in recorder.seen)
    assert all(s.headers.get("user-agent") == USER_AGENT for s in recorder.seen)
    assert "p:ss" not in repr(client) and "p%3Ass" not in client.redacted_url


def test_signature_headers_only_with_a_key(recorder: Recorder, client_for: Callable[..., SyncClient]) -> None:
    every_leg(client_for(recorder.url))
    assert len(recorder.seen) == 4
    assert not any("x-smsgw-timestamp" in s.headers or "x-smsgw-signature" in s.headers for s in recorder.seen)
    recorder.seen.clear()
    every_leg(client_for(recorder.url, signing_key=KEY))
    assert len(recorder.seen) == 4
    for seen in recorder.seen:
        assert re.fullmatch(r"sha256=[0-9a-f]{64}", seen.headers["x-smsgw-signature"])
        assert abs(int(seen.headers["x-smsgw-timestamp"]) - time.time()) < 60


def test_network_errors_do_not_carry_the_secret(client_for: Callable[..., SyncClient]) -> None:
    client = client_for(f"http://127.0.0.1:{free_port()}/smssync", signing_key=KEY)
    with pytest.raises(requests.ConnectionError) as caught:
        client.get(task="send", secret="top-secret-value")
    assert "top-secret-value" not in str(caught.value) and "secret=***" in str(caught.value)
    assert KEY not in repr(client) and KEY not in repr(client._auth)


def test_one_client_serves_many_threads(recorder: Recorder, client_for: Callable[..., SyncClient]) -> None:
    client = client_for(recorder.url, signing_key=KEY)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: client.get(task="send", n=str(i)), range(40)))
    assert answers == [SyncAnswer(200, OK_BODY)] * 40
    assert len(client._sessions) > 1  # one session per thread: requests sessions are not thread-safe
    client.close()
    assert client.get(task="send").status == 200  # usable again after close()


# --- signatures against the documented recipes -----------------------------------------------------------------


def doc_block(language: str) -> str:
    """The first fenced code block of ``language`` in docs/signing.md."""
    match = re.search(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert match, f"no ```{language} block in {DOC}"
    return match.group(1)


def python_recipe() -> Callable[..., str | None]:
    namespace: dict[str, Any] = {}
    exec(doc_block("python"), namespace)  # the doc's own code, so the doc cannot drift from what is tested
    recipe: Callable[..., str | None] = namespace["smsgw_signature_error"]
    return recipe


def test_the_documented_python_recipe_is_the_reference_servers_code() -> None:
    module = (ROOT / "reference_server" / "signing.py").read_text(encoding="utf-8")
    quoted = module.split("# --- recipe: begin ---\n")[1].split("# --- recipe: end ---")[0]
    assert doc_block("python").strip() == quoted.strip()


def signed_requests(recorder: Recorder, client_for: Callable[..., SyncClient]) -> list[Seen]:
    """Every leg's request as signed by the client with KEY, as it arrived (a same-host redirect hop included)."""
    recorder.respond = lambda s: (
        (307, {"Location": "/v2?x=1"}, "") if s.method == "PUT" and s.target == "/smssync" else (200, {}, OK_BODY)
    )
    every_leg(client_for(recorder.url, signing_key=KEY))
    assert [s.method for s in recorder.seen] == ["GET", "POST", "PUT", "PUT", "GET"]
    return list(recorder.seen)


def verify(recipe: Callable[..., str | None], seen: Seen, key: str = KEY, now: float | None = None) -> str | None:
    return recipe(
        key,
        seen.method,
        seen.target,
        seen.body,
        timestamp=seen.headers.get("x-smsgw-timestamp"),
        signature=seen.headers.get("x-smsgw-signature"),
        now=now,
    )


def tampered(seen: Seen) -> dict[str, Seen]:
    """``seen`` altered in each signed part."""
    timestamp = str(int(seen.headers["x-smsgw-timestamp"]) - 1)
    return {
        "body": dataclasses.replace(seen, body=seen.body + b"&message=forged"),
        "path": dataclasses.replace(seen, target="/other" + seen.target),
        "query": dataclasses.replace(seen, target=seen.target + "&task=result"),
        "method": dataclasses.replace(seen, method="POST" if seen.method != "POST" else "PUT"),
        "timestamp": dataclasses.replace(seen, headers={**seen.headers, "x-smsgw-timestamp": timestamp}),
        "unsigned": dataclasses.replace(
            seen, headers={k: v for k, v in seen.headers.items() if not k.startswith("x-smsgw-")}
        ),
    }


def test_signed_requests_verify_with_the_documented_recipe_and_tampering_fails(
    recorder: Recorder, client_for: Callable[..., SyncClient]
) -> None:
    recipe = python_recipe()
    requests_seen = signed_requests(recorder, client_for)
    assert requests_seen[0].target.startswith("/smssync?task=send&secret=s%26cret+%C3%A9")
    assert requests_seen[3].target == "/v2?x=1"  # the redirect hop is signed for its own path
    for seen in requests_seen:
        assert verify(recipe, seen) is None, seen
        assert verify(recipe, seen, key="another key") == "X-SMSGW-Signature does not match"
        for part, altered in tampered(seen).items():
            assert verify(recipe, altered) is not None, (part, seen)
        sent_at = int(seen.headers["x-smsgw-timestamp"])
        assert verify(recipe, seen, now=sent_at + 300) is None
        assert "5 minutes" in (verify(recipe, seen, now=sent_at + 301) or "")
        assert "5 minutes" in (verify(recipe, seen, now=sent_at - 301) or "")


def replay(port: int, seen: Seen) -> int:
    """Send ``seen`` again byte for byte (target, signature headers, body) and return the status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {k: v for k, v in seen.headers.items() if k not in ("host", "content-length", "connection")}
        connection.request(seen.method, seen.target, body=seen.body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not on PATH under CI (tests/peers/install.sh installs it)")
        pytest.skip(f"{name} is not on PATH (tests/peers/install.sh installs it)")
    return path


@dataclass
class RecipeServer:
    """A PHP or Node server running the doc's recipe on a free loopback port (stopped by its PID)."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def wait_ready(self) -> None:
        def answers() -> bool:
            assert self.process.poll() is None, self.log.read_text()
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            try:
                connection.request("GET", "/ready")
                return connection.getresponse().status in (200, 401)
            except OSError:
                return False
            finally:
                connection.close()

        wait_for(answers, timeout=15, what=f"recipe server on port {self.port}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_recipe_server(command: list[str], tmp_path: Path, port: int) -> RecipeServer:
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SMSGW_SIGNING_KEY": KEY, "PORT": str(port)},
        )
    server = RecipeServer(process, port, log)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def check_against(server: RecipeServer, requests_seen: list[Seen]) -> None:
    for seen in requests_seen:
        assert replay(server.port, seen) == 200, (seen, server.log.read_text())
        for part, altered in tampered(seen).items():
            assert replay(server.port, altered) == 401, (part, seen)


def test_signed_requests_verify_with_the_documented_php_recipe(
    tmp_path: Path, recorder: Recorder, client_for: Callable[..., SyncClient]
) -> None:
    php = require_tool("php")
    requests_seen = signed_requests(recorder, client_for)
    # The doc's block is a complete front script; the Sync handler after it just says success.
    (tmp_path / "router.php").write_text(doc_block("php") + "\necho '" + OK_BODY + "';\n", encoding="utf-8")
    port = free_port()
    server = start_recipe_server([php, "-S", f"127.0.0.1:{port}", "router.php"], tmp_path, port)
    try:
        check_against(server, requests_seen)
    finally:
        server.stop()


def test_signed_requests_verify_with_the_documented_node_recipe(
    tmp_path: Path, recorder: Recorder, client_for: Callable[..., SyncClient]
) -> None:
    node = require_tool("node")
    requests_seen = signed_requests(recorder, client_for)
    handler = (
        "function handleSync(req, res, rawBody) {\n"
        "  res.writeHead(200, { 'Content-Type': 'application/json' });\n"
        f"  res.end('{OK_BODY}');\n"
        "}\n"
    )
    (tmp_path / "server.js").write_text(doc_block("js") + handler, encoding="utf-8")
    port = free_port()
    server = start_recipe_server([node, "server.js"], tmp_path, port)
    try:
        check_against(server, requests_seen)
    finally:
        server.stop()


def test_query_values_are_url_encoded_once(recorder: Recorder, client_for: Callable[..., SyncClient]) -> None:
    client_for(recorder.url + "?key=1").get(task="send", secret="a&b= c")
    target = recorder.seen[0].target
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(target).query) == {
        "key": ["1"],
        "task": ["send"],
        "secret": ["a&b= c"],
    }


def test_a_redirecting_sync_url_is_logged_once_with_the_final_url(
    recorder: Recorder, client_for: Callable[..., SyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    recorder.respond = lambda s: (
        (301, {"Location": s.target.replace("/smssync", "/smssync/", 1)}, "")
        if s.target.startswith("/smssync") and not s.target.startswith("/smssync/")
        else (200, {}, OK_BODY)
    )
    client = client_for(recorder.url)
    with caplog.at_level("WARNING", logger="services.sync_client"):
        for _ in range(7):  # polls every few seconds: one line, not one per poll
            assert client.get(task="send", secret="s3cret").status == 200
            assert client.send("POST", b"message=hi", "application/x-www-form-urlencoded").status == 200
    lines = [r.getMessage() for r in caplog.records if "redirects" in r.getMessage()]
    assert lines == [
        f"endpoint default: Sync URL redirects (HTTP 301) to http://127.0.0.1:{recorder.port}/smssync/; set its "
        "sync_url to that URL to avoid the extra hop (logged once)"
    ]
    assert len(recorder.seen) == 28  # every request still followed the redirect
