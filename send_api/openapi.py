"""The REST API's OpenAPI 3.1 document, served at ``/api/v1/openapi.json`` (tests validate it)."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ERROR}}}
    if retry:
        response["headers"] = _RETRY_AFTER
    return response


SEND_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["to", "text"],
    "additionalProperties": False,
    "properties": {
        "to": {
            "description": "one phone number (+<digits>) or a list of up to 100",
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 100},
            ],
        },
        "text": {"type": "string", "minLength": 1, "description": "the text; long texts go out as multipart SMS"},
        "id": {
            "type": "string",
            "maxLength": 200,
            "description": "your id of the request: a retry with the same id queues nothing new (idempotency key)",
        },
        "route": {"type": "string", "description": "send through the modems of the [[routes]] entry of this prefix"},
        "modem": {"type": "string", "description": "send through this modem only"},
        "ttl": {
            "type": "integer",
            "minimum": 1,
            "description": "seconds the message stays worth sending: not sent after that, but failed",
        },
    },
}

MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["id", "to", "state", "created_at", "history"],
    "properties": {
        "id": {"type": "string"},
        "client_id": {"type": "string"},
        "to": {"type": "string"},
        "state": {"$ref": "#/components/schemas/State"},
        "created_at": {"type": "string", "format": "date-time"},
        "history": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["state", "at"],
                "properties": {
                    "state": {"$ref": "#/components/schemas/State"},
                    "at": {"type": "string", "format": "date-time"},
                    "detail": {"type": "string"},
                },
            },
        },
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "smssync-gateway send API",
        "version": "1",
        "description": "Send SMS through the gateway's modems and look up their state. Authorization: Bearer <api_key> "
        "of a fleet endpoint; the endpoint's events (webhook, status pushes) report the states.",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/messages": {
            "post": {
                "operationId": "sendMessages",
                "summary": "Queue one message per recipient",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SendRequest"}}},
                },
                "responses": {
                    "202": {
                        "description": "queued (or queued by an earlier request with the same id: duplicate true)",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SendAnswer"}}},
                    },
                    "400": _error("a field is missing or wrong (the error names it)"),
                    "401": _error("wrong or missing API key"),
                    "413": _error("body over SMSGW_API_MAX_BODY"),
                    "429": _error("over the key's rate (SMSGW_API_RATE)", retry=True),
                    "503": _error("outbound queue full (backpressure), or RabbitMQ/the store down", retry=True),
                },
            }
        },
        "/api/v1/messages/{message_id}": {
            "get": {
                "operationId": "getMessage",
                "summary": "A message's state and history",
                "parameters": [{"name": "message_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {
                        "description": "the message",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Message"}}},
                    },
                    "401": _error("wrong or missing API key"),
                    "404": _error("no such message for this API key"),
                    "503": _error("the store does not answer", retry=True),
                },
            }
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "State": {"type": "string", "enum": ["queued", "sent", "delivered", "failed", "unknown"]},
            "SendRequest": SEND_REQUEST,
            "SendAnswer": {
                "type": "object",
                "required": ["messages"],
                "properties": {
                    "messages": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["id", "to", "duplicate"],
                            "properties": {
                                "id": {"type": "string"},
                                "to": {"type": "string"},
                                "duplicate": {"type": "boolean"},
                            },
                        },
                    }
                },
            },
            "Message": MESSAGE,
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        },
    },
}
