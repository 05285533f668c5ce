"""The admin settings of the reference server (``POST /_config``, ``ReferenceServer.configure``): their
validation, so that a bad request changes nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reference_server.codes import as_int
from reference_server.errors import BadRequestError

#: Every key ``POST /_config`` accepts.
CONFIG_KEYS: frozenset[str] = frozenset(
    {"fail_status", "fail_count", "success_as_string", "reply", "secret", "delivered_ok_code", "signing_key"}
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(settings: Mapping[str, Any]) -> None:
    """Check admin settings before any is applied.

    Keys: ``fail_status`` (int HTTP status or None), ``fail_count`` (int ≥ 0 or None = until cleared),
    ``success_as_string`` (bool), ``reply`` (bool), ``secret`` (str), ``delivered_ok_code`` (int),
    ``signing_key`` (str; "" turns signature checks off).

    Raises:
        BadRequestError: an unknown key or a value of the wrong type.
    """
    unknown = set(settings) - CONFIG_KEYS
    if unknown:
        raise BadRequestError(f"unknown config keys: {sorted(unknown)}")
    fail_status = settings.get("fail_status")
    if fail_status is not None and (not _is_int(fail_status) or not 100 <= fail_status <= 599):
        raise BadRequestError("fail_status must be an HTTP status code or null")
    fail_count = settings.get("fail_count")
    if fail_count is not None and (not _is_int(fail_count) or fail_count < 0):
        raise BadRequestError("fail_count must be a non-negative integer or null")
    for key in ("success_as_string", "reply"):
        if key in settings and not isinstance(settings[key], bool):
            raise BadRequestError(f"{key} must be a boolean")
    for key in ("secret", "signing_key"):
        if key in settings and not isinstance(settings[key], str):
            raise BadRequestError(f"{key} must be a string")
    if "delivered_ok_code" in settings and as_int(settings["delivered_ok_code"]) is None:
        raise BadRequestError("delivered_ok_code must be an integer")
