"""The send API's own variables (``ApiSettings``) and the credentials each fleet endpoint accepts (``Credentials``)."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from services.config import EndpointConfig
from services.config.variables import read_var

# What ``python -m send_api`` reads besides the common variables (its WorkerEnv adds these).
API_VARS = ("SMSGW_API_ADDR", "SMSGW_API_PORT", "SMSGW_API_MAX_QUEUED", "SMSGW_API_RATE", "SMSGW_API_MAX_BODY")
DEFAULT_METRICS_PORT = 9105


@dataclass(frozen=True)
class ApiSettings:
    """Where the API listens and its limits."""

    addr: str = "127.0.0.1"
    port: int = 8090
    max_queued: int = 1000  # messages an outbound queue may hold before 503
    rate: float = 10.0  # messages per second per key; bursts of BURST_FACTOR times that
    max_body: int = 65536  # bytes

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ApiSettings:
        """Read ``API_VARS``. Raises ConfigError naming the variable of a bad value."""
        env = os.environ if environ is None else environ
        addr, port, max_queued, rate, max_body = (read_var(env, name) for name in API_VARS)
        return cls(addr=addr, port=port, max_queued=max_queued, rate=rate, max_body=max_body)


@dataclass(frozen=True)
class Credentials:
    """What one endpoint accepts: its kind, an API key (RapidPro ``Token``, REST ``Bearer``), Kannel's user and
    password. Empty = that way in is closed."""

    endpoint: str
    kind: str = "smssync"
    api_key: str = field(default="", repr=False)
    username: str = ""
    password: str = field(default="", repr=False)

    @classmethod
    def of(cls, endpoint: EndpointConfig) -> Credentials:
        """The credentials of a fleet endpoint (``kind``, ``api_key``, ``username``, ``password``: issue 15's
        fleet keys; an endpoint without them accepts nothing)."""
        # getattr: the fleet keys of the endpoint kinds land in EndpointConfig beside this worker (issue 15).
        return cls(
            endpoint=endpoint.name,
            kind=str(getattr(endpoint, "kind", "smssync")),
            api_key=str(getattr(endpoint, "api_key", "") or ""),
            username=str(getattr(endpoint, "username", "") or ""),
            password=str(getattr(endpoint, "password", "") or ""),
        )

    def key_matches(self, presented: str) -> bool:
        """Whether ``presented`` is this endpoint's API key (constant time)."""
        return bool(self.api_key) and hmac.compare_digest(self.api_key.encode(), presented.encode())

    def login_matches(self, username: str, password: str) -> bool:
        """Whether the Kannel login is this endpoint's (constant time)."""
        return (
            bool(self.username and self.password)
            and hmac.compare_digest(self.username.encode(), username.encode())
            and hmac.compare_digest(self.password.encode(), password.encode())
        )


class Keyring:
    """Every endpoint's credentials, looked up per API."""

    def __init__(self, credentials: Iterable[Credentials]) -> None:
        self._all = tuple(credentials)

    def __bool__(self) -> bool:
        return any(c.api_key or (c.username and c.password) for c in self._all)

    def by_key(self, presented: str) -> Credentials | None:
        """The endpoint whose API key is ``presented`` (any kind: the REST API), or None."""
        found = None
        for credentials in self._all:  # no early exit: the time taken does not say which key matched
            if credentials.key_matches(presented):
                found = found or credentials
        return found

    def rapidpro(self, endpoint: str, presented: str) -> Credentials | None:
        """The RapidPro endpoint ``endpoint`` if ``presented`` is its key, else None."""
        for credentials in self._all:
            if credentials.endpoint == endpoint and credentials.kind == "rapidpro":
                return credentials if credentials.key_matches(presented) else None
        return None

    def kannel(self, username: str, password: str) -> Credentials | None:
        """The Kannel endpoint of this login, or None."""
        found = None
        for credentials in self._all:
            if credentials.kind == "kannel" and credentials.login_matches(username, password):
                found = found or credentials
        return found


def bearer_token(header: str, schemes: tuple[str, ...] = ("bearer",)) -> str:
    """The credential of an ``Authorization`` header of one of ``schemes`` (case-insensitive), else ""."""
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() in schemes else ""
