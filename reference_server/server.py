"""The project's reference SMSsync Sync server: the server side of the protocol, implemented as the docs say.

It is what the gateway's integration tests and the operator demo talk to. ``ReferenceServer`` binds it and
serves it on a thread (tests, demo) or in the calling thread (``python -m reference_server``). The parts:

* ``state.py`` — everything the server holds, in memory under one lock; ``codes.py`` the result-code convention;
  ``config.py`` the admin settings (``POST /_config``);
* ``protocol.py`` — the replies on the Sync path (incoming SMS, ``task=send``/``sent``/``result``);
* ``handler.py`` — the HTTP plumbing and the admin endpoints; ``bodies.py`` request bodies; ``pages.py`` HTML;
* ``signing.py`` — the request-signing recipe (docs/signing.md).

With a signing key (``--signing-key``), every request on the Sync path must carry a valid ``X-SMSGW-Timestamp`` /
``X-SMSGW-Signature`` pair; a missing or bad signature, or a timestamp more than 5 minutes off, → 401
``{"payload":{"success":false,"error":...}}``.

Result-code convention: a sent code of ``0`` (docs) or ``-1`` (Android ``RESULT_OK``) means "sent"; any
other sent code means "failed". A delivered code equal to ``delivered_ok_code`` (default ``0`` as in the
docs; set it to ``-1`` for the Android convention) means "delivered"; otherwise the SMS stays "sent".
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from reference_server.handler import ReferenceHTTPServer
from reference_server.state import JSONDict, ServerState

logger = logging.getLogger("reference_server")


def _normalise_path(path: str) -> str:
    """Sync path with exactly one leading slash and no trailing slash (both spellings are served)."""
    stripped = "/" + path.strip("/")
    return stripped


class ReferenceServer:
    """In-process reference SMSsync server for tests and the demo.

    Example::

        with ReferenceServer("s3cret", reply=True) as server:
            requests.post(server.url, data={...})
            assert server.received()[0]["from"] == "+255700000001"
    """

    def __init__(
        self,
        secret: str,
        port: int = 0,
        path: str = "/smssync",
        reply: bool = False,
        *,
        host: str = "127.0.0.1",
        delivered_ok_code: int = 0,
        signing_key: str = "",
    ) -> None:
        self._host = host
        self._port = port
        self._path = _normalise_path(path)
        self._state = ServerState(secret, reply=reply, delivered_ok_code=delivered_ok_code, signing_key=signing_key)
        self._httpd: ReferenceHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ReferenceServer:
        """Bind and serve in a daemon thread; returns self.

        Raises:
            RuntimeError: already started.
            OSError: the port cannot be bound.
        """
        if self._httpd is not None:
            raise RuntimeError("reference server already started")
        self._httpd = ReferenceHTTPServer((self._host, self._port), self._state, self._path)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="reference-server",
            daemon=True,
        )
        self._thread.start()
        logger.info("reference server started", extra={"host": self._host, "port": self._port, "path": self._path})
        return self

    def serve_forever(self) -> None:
        """Bind and serve in the calling thread until interrupted (the CLI's mode).

        Raises:
            OSError: the port cannot be bound.
        """
        self._httpd = ReferenceHTTPServer((self._host, self._port), self._state, self._path)
        self._port = self._httpd.server_address[1]
        logger.info("reference server started", extra={"host": self._host, "port": self._port, "path": self._path})
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._httpd.server_close()
            self._httpd = None

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        logger.info("reference server stopped", extra={"port": self._port})

    def __enter__(self) -> ReferenceServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the requested one before start())."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://host:port`` (admin endpoints live under it)."""
        return f"http://{self._host}:{self._port}"

    @property
    def url(self) -> str:
        """The full Sync URL to configure on the gateway."""
        return self.base_url + self._path

    @property
    def secret(self) -> str:
        """The current secret."""
        return self._state.secret

    def received(self) -> list[JSONDict]:
        """Incoming SMS received so far (each message_id once)."""
        return self._state.received()

    def outgoing(self) -> list[JSONDict]:
        """Outgoing SMS with status (pending/queued/sent/delivered/failed) and result rows."""
        return self._state.outgoing()

    def queue_outgoing(self, to: str, message: str, uuid: str | None = None) -> str:
        """Queue an SMS for ``task=send`` polls and return its uuid.

        Raises:
            BadRequestError: empty ``to``/``message`` or a uuid already used.
        """
        return str(self._state.queue_outgoing(to, message, uuid)["uuid"])

    def state(self) -> JSONDict:
        """Same document as ``GET /_state``."""
        return self._state.snapshot()

    def configure(self, **settings: Any) -> JSONDict:
        """Same as ``POST /_config``: fail_status, fail_count, success_as_string, reply, secret,
        delivered_ok_code, signing_key. Returns the public configuration.

        Raises:
            BadRequestError: unknown key or bad value.
        """
        return self._state.configure(settings)
