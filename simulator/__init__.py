"""A GSM modem simulator on a pseudo-terminal, for tests, the demo and dry runs (see docs/simulator.md).

from simulator import Simulator
with Simulator("/tmp/smsgw-modem0") as sim:
    sim.inject_sms("+255712345678", "Habari")
"""

from .device import DEFAULT_CAPACITY, DEFAULT_OWN_NUMBER, DEFAULT_SMSC, Simulator
from .model import SimFullError
from .pdu import DecodedPdu, PduError, build_deliver, build_status_report, decode_pdu

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_OWN_NUMBER",
    "DEFAULT_SMSC",
    "DecodedPdu",
    "PduError",
    "SimFullError",
    "Simulator",
    "build_deliver",
    "build_status_report",
    "decode_pdu",
]
