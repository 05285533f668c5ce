"""The knobs of the simulated modem (``POST /state``, docs/simulator.md) and their validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .identity import UssdEncoding

Delivery = Literal["delivered", "failed", "none"]
Storage = Literal["normal", "full"]


@dataclass
class Behaviour:
    """The knobs of POST /state (see docs/simulator.md)."""

    signal: int = 20
    battery: int = 100
    registered: bool = True
    fail_sends: int = 0
    cms_error: int = 500
    delivery: Delivery = "delivered"
    delivery_delay_s: float = 1.0
    reply_delay_s: float = 0.0
    send_delay_s: float = 0.0
    # --- field faults (docs/simulator.md, "Faults") ---
    hang: bool = False
    pin: str | None = None
    reject_numbers: list[str] = field(default_factory=list)
    reject_cms: int = 21
    block_after: int | None = None
    block_cms: int = 8
    ussd: dict[str, str] = field(default_factory=dict)
    ussd_encoding: UssdEncoding = "ucs2"
    noise: bool = False
    noise_seed: int = 0
    noise_rate: float = 0.3
    storage: Storage = "normal"
    imei: str = ""
    iccid: str = ""
    imsi: str = ""

    def update(self, changes: dict[str, Any]) -> None:
        """Validate and apply a subset of fields; nothing is applied if any value is invalid.

        Raises ValueError naming the offending key.
        """
        staged = asdict(self)
        for key, value in changes.items():
            if key not in staged:
                raise ValueError(f"unknown state key {key!r}")
            staged[key] = _validate(key, value)
        for key, value in staged.items():
            setattr(self, key, value)


_DIGITS = {"imei": (15, 15), "iccid": (18, 22), "imsi": (6, 15)}


def _is_int(value: Any) -> bool:
    """True for a JSON integer (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_fault(key: str, value: Any) -> Any:
    """Check one fault knob; return its normalised value. Raises ValueError when mistyped or out of range."""
    if key in ("hang", "noise"):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be a boolean")
    elif key == "pin":
        if value is not None and not (isinstance(value, str) and value.isdigit() and 4 <= len(value) <= 8):
            raise ValueError("pin must be 4-8 digits or null")
    elif key == "reject_numbers":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError("reject_numbers must be a list of non-empty number prefixes")
        value = list(value)
    elif key == "block_after":
        if value is not None and not (_is_int(value) and value >= 0):
            raise ValueError("block_after must be a non-negative integer or null")
    elif key == "ussd":
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError("ussd must be an object mapping codes to answer texts")
        value = dict(value)
    elif key == "ussd_encoding":
        if value not in ("ucs2", "gsm7"):
            raise ValueError('ussd_encoding must be "ucs2" or "gsm7"')
    elif key == "noise_seed":
        if not _is_int(value):
            raise ValueError("noise_seed must be an integer")
    elif key == "noise_rate":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError("noise_rate must be a number in [0, 1]")
        value = float(value)
    elif key == "storage":
        value = "normal" if value is None else value
        if value not in ("normal", "full"):
            raise ValueError('storage must be "normal", "full" or null')
    elif key in _DIGITS:
        lo, hi = _DIGITS[key]
        if not (isinstance(value, str) and value.isdigit() and lo <= len(value) <= hi):
            raise ValueError(f"{key} must be {lo}-{hi} digits" if lo != hi else f"{key} must be {lo} digits")
    return value


_FAULT_KEYS = frozenset(
    {"hang", "noise", "noise_seed", "noise_rate", "pin", "reject_numbers", "block_after", "ussd", "ussd_encoding"}
    | {"storage", *_DIGITS}
)


def _validate(key: str, value: Any) -> Any:
    """Check one Behaviour value; return it. Raises ValueError when out of range or mistyped."""
    if key in _FAULT_KEYS:
        return _validate_fault(key, value)
    ranges: dict[str, tuple[float, float]] = {
        "signal": (0, 31),
        "battery": (0, 100),
        "fail_sends": (0, 1_000_000),
        "cms_error": (0, 999),
        "reject_cms": (0, 999),
        "block_cms": (0, 999),
    }
    if key == "registered":
        if not isinstance(value, bool):
            raise ValueError("registered must be a boolean")
    elif key == "delivery":
        if value not in ("delivered", "failed", "none"):
            raise ValueError('delivery must be "delivered", "failed" or "none"')
    elif key in ranges:
        lo, hi = ranges[key]
        # 99 is +CSQ's "not known or not detectable".
        valid = (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (lo <= value <= hi or (key == "signal" and value == 99))
        )
        if not valid:
            raise ValueError(f"{key} must be an integer in [{lo:g}, {hi:g}]" + (" or 99" if key == "signal" else ""))
    else:  # the *_delay_s keys
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
            raise ValueError(f"{key} must be a number of seconds in [0, 3600]")
        value = float(value)
    return value
