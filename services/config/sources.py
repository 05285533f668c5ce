"""Where settings come from besides the variables themselves: URLs (split and checked, shown without secrets)
and secret files (read without their trailing newline, never shown), and the one error every setting raises.

Kept apart from the variable table (``services.config.variables``) so that the fleet file reader and the process
settings use the same readers.
"""

from __future__ import annotations

import re
import urllib.parse

# Characters str.splitlines() breaks at: a value quoted in a message (a path, a TOML key) must not split its line.
_LINE_BREAKS = str.maketrans({ch: repr(ch)[1:-1] for ch in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the environment variable, on one line (line breaks
    in the values it quotes are escaped)."""

    def __init__(self, message: str) -> None:
        super().__init__(message.translate(_LINE_BREAKS))


def split_url(name: str, raw: str) -> urllib.parse.SplitResult:
    """``raw`` split into its parts, its port checked (1-65535).

    Raises:
        ConfigError: not a URL (an unclosed ``[`` of an IPv6 address, a port that is no number or out of range);
            the message names ``name`` and shows the URL without its password and secret.
    """
    try:
        parts = urllib.parse.urlsplit(raw)
        port = parts.port  # parsed (and range-checked) only when asked for
    except ValueError as exc:
        raise ConfigError(f"{name}: not a valid URL ({exc}): {redact_url(raw)!r}") from None
    if port == 0:
        raise ConfigError(f"{name}: port 0 is not a port to connect to: {redact_url(raw)!r}")
    return parts


def amqp_urls(raw: str) -> list[str]:
    """The broker URLs of ``SMSGW_AMQP_URL`` (one, or several of one cluster separated by commas)."""
    return [url.strip() for url in raw.split(",") if url.strip()]


def read_secret_file(name: str, path: str) -> str:
    """The secret in the file ``path`` (setting ``name``), without the trailing newline editors and ``echo`` add.

    Raises:
        ConfigError: the file cannot be read (the message names the setting and the path, never the content).
    """
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {not_utf8(exc)}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path (open() refuses it)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{name}: cannot read {path}: {reason}") from None


def not_utf8(exc: UnicodeDecodeError) -> str:
    """Why a file could not be decoded, in words, without its content (it may be a secret): where, not what."""
    line = bytes(exc.object[: exc.start]).count(b"\n") + 1
    return f"not UTF-8 text (an invalid byte on line {line}, at offset {exc.start}); save it as UTF-8"


def redact_url(url: str) -> str:
    """Return ``url`` with any password and the ``secret`` query parameter replaced by ``***`` (for logs); a text
    that is no valid URL gets the same treatment by pattern."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is no number or out of range
    except ValueError:
        hidden = re.sub(r"^([^:/?#]*://[^/?#@]*?:)[^/?#@]*@", r"\1***@", url)
        return re.sub(r"([?&]secret=)[^&#]*", r"\1***", hidden)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    redacted = urllib.parse.urlencode([(k, "***" if k == "secret" else v) for k, v in query])
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, redacted, parts.fragment))
