"""Verification of the gateway's request signatures (``X-SMSGW-Timestamp`` / ``X-SMSGW-Signature``).

The block between the ``recipe`` markers is quoted verbatim by docs/signing.md as the Python recipe for server
authors (tests/test_sync_client.py checks the two are the same and runs the doc's copy), so it uses the standard
library only and carries its own constant.
"""

from __future__ import annotations

# --- recipe: begin ---
import hashlib
import hmac
import time

REPLAY_WINDOW_S = 300  # accept timestamps at most 5 minutes from this server's clock, either way


def smsgw_signature_error(
    key: str,
    method: str,
    path_query: str,
    raw_body: bytes,
    *,
    timestamp: str | None,
    signature: str | None,
    now: float | None = None,
) -> str | None:
    """None when the request is signed with ``key``; else why not (for a 401 answer, never with the key).

    ``path_query`` is the request target exactly as received (path and query string, not re-encoded),
    ``raw_body`` the body bytes as received, read before any form or JSON parsing; ``timestamp`` and
    ``signature`` are the X-SMSGW-Timestamp and X-SMSGW-Signature headers (None when absent).
    """
    if not timestamp or not signature:
        return "missing X-SMSGW-Timestamp or X-SMSGW-Signature header"
    if not (timestamp.isascii() and timestamp.isdigit()):
        return "X-SMSGW-Timestamp is not epoch seconds"
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > REPLAY_WINDOW_S:
        return "X-SMSGW-Timestamp is more than 5 minutes away from the server's clock"
    message = f"{timestamp}.{method.upper()}.{path_query}.".encode() + raw_body
    expected = "sha256=" + hmac.new(key.encode(), message, hashlib.sha256).hexdigest()
    # Constant time: an ordinary == tells an attacker, byte by byte, how much of a forged signature is right.
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        return "X-SMSGW-Signature does not match"
    return None


# --- recipe: end ---
