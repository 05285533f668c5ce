"""The two ways a request can be refused before the protocol answers it (both end in the docs' failure payload)."""

from __future__ import annotations


class BadRequestError(ValueError):
    """A request the server cannot make sense of; answered with HTTP 400 and the docs' failure payload."""


class TooLargeError(Exception):
    """Request body over ``bodies.MAX_BODY_BYTES``; answered with HTTP 413."""
