"""Endpoint kinds (issue 15): how one platform receives an inbound SMS and hears of a message's state.

One module per kind -- ``smssync`` (today's Sync URL POST; states go through ``?task=result`` rounds, not
here), ``rapidpro`` (courier's External channel), ``kannel`` (an sms-service get-url, dlr-url reports) and
``webhook`` (signed JSON events) -- each a ``Platform``. The sync worker and the result reporter stay
kind-agnostic: they call ``deliver``/``report`` and judge the HTTP answer the same way for every kind (2xx done;
408, 429, 5xx, network errors and time-outs retried through the delay tiers; other 4xx refusals, bounded).
Every request goes through the one HTTP path, ``services.sync_client.SyncClient`` (deadline, same-host
redirects, Basic auth from the URL, signing with the endpoint's ``signing_key``, secrets masked).
"""

from __future__ import annotations

from services.config import EndpointConfig
from services.platforms import kannel, rapidpro, smssync, webhook
from services.platforms.base import (
    ENDPOINT_INFO,
    PUSH_STATES,
    RETRY_STATUSES,
    Platform,
    init_endpoint_info,
    is_refusal,
    push_state,
    rfc3339,
)

__all__ = [
    "ENDPOINT_INFO",
    "PUSH_STATES",
    "RETRY_STATUSES",
    "Platform",
    "init_endpoint_info",
    "is_refusal",
    "kannel",
    "platform_for",
    "push_state",
    "rapidpro",
    "rfc3339",
    "smssync",
    "webhook",
]


def platform_for(endpoint: EndpointConfig) -> Platform:
    """The ``Platform`` of ``endpoint``'s kind, with its own HTTP client (``close()`` it when done)."""
    if endpoint.kind == "rapidpro":
        return rapidpro.RapidPro(endpoint)
    if endpoint.kind == "kannel":
        return kannel.Kannel(endpoint)
    if endpoint.kind == "webhook":
        return webhook.Webhook(endpoint)
    return smssync.Smssync(endpoint)
