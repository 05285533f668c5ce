"""The device commands of the simulated modem (27.007): functionality, error mode, SIM PIN, identification,
operator and registration, signal, battery, own number, character set, and USSD."""

from __future__ import annotations

from collections.abc import Callable

from modem_worker.sms_text import is_gsm7

from . import jsonlog
from .at_syntax import (
    CME_INCORRECT_PASSWORD,
    CME_INVALID_PARAM,
    CME_NO_NETWORK,
    CME_NOT_SUPPORTED,
    CME_OPERATION_NOT_ALLOWED,
    CME_SIM_PUK_REQUIRED,
    Handler,
    Reply,
    cme,
    simple,
    split_args,
)
from .identity import decode_ussd_request, encode_ussd
from .model import SIM_READY, ModemModel

MANUFACTURER = "smssync"
MODEL = "smssync-simulator"
REVISION = "1.0"
OPERATOR = "SIMULATED"
OPERATOR_NUMERIC = "64004"


class DeviceCommands:
    """The 27.007 handlers over one model; every handler runs with the model lock held."""

    def __init__(self, model: ModemModel) -> None:
        """Bind the handlers to ``model``."""
        self.model = model

    def handlers(self) -> dict[str, Handler]:
        """The extended commands this class answers, by name."""
        return {
            "+CFUN": self._cfun,
            "+CMEE": self._cmee,
            "+CPIN": self._cpin,
            "+CGMI": self._ident(MANUFACTURER),
            "+GMI": self._ident(MANUFACTURER),
            "+CGMM": self._ident(MODEL),
            "+GMM": self._ident(MODEL),
            "+CGMR": self._ident(REVISION),
            "+GMR": self._ident(REVISION),
            "+CGSN": self._identity("imei"),
            "+GSN": self._identity("imei"),
            "+CIMI": self._identity("imsi"),
            "+CCID": self._ccid,
            "^ICCID": self._ccid,
            "+GCAP": self._gcap,
            "+COPS": self._cops,
            "+CREG": self._creg("+CREG"),
            "+CGREG": self._creg("+CGREG"),
            "+CSQ": self._csq,
            "+CBC": self._cbc,
            "+CNUM": self._cnum,
            "+CSCS": self._cscs,
            "+CLIP": simple("+CLIP: 1,1"),
            "+CRC": simple("+CRC: 1"),
            "+CVHU": simple("+CVHU: 0"),
            "+IFC": simple("+IFC: 2,2", "+IFC: (0-2),(0-2)"),
            "+CMMS": simple("+CMMS: 0", "+CMMS: (0-2)"),
            "+CUSD": self._cusd,
        }

    def identification(self) -> list[str]:
        """What ATI answers: manufacturer and model, revision, IMEI. Called with the model lock held."""
        return [f"{MANUFACTURER} {MODEL}", f"Revision: {REVISION}", f"IMEI: {self.model.behaviour.imei}"]

    def _cfun(self, op: str, args: str) -> Reply:
        """+CFUN: always full functionality (1)."""
        if op == "read":
            return Reply(lines=["+CFUN: 1"])
        if op == "test":
            return Reply(lines=["+CFUN: (0,1,4),(0,1)"])
        return Reply()

    def _cmee(self, op: str, args: str) -> Reply:
        """+CMEE: error reporting mode 0-2."""
        session = self.model.session
        if op == "read":
            return Reply(lines=[f"+CMEE: {session.cmee}"])
        if op == "test":
            return Reply(lines=["+CMEE: (0-2)"])
        if op == "set":
            value = int(args or "0")
            if value not in (0, 1, 2):
                return cme(self.model, CME_INVALID_PARAM)
            session.cmee = value
        return Reply()

    def _cpin(self, op: str, args: str) -> Reply:
        """+CPIN? reports READY / SIM PIN / SIM PUK; +CPIN=<pin> (quoted or not) unlocks with the right PIN,
        three wrong ones block the SIM (SIM PUK). Entering a PUK is not simulated (POST /state "pin" = a new
        SIM)."""
        if op == "read":
            return Reply(lines=[f"+CPIN: {self.model.sim_status}"])
        if op != "set":
            return Reply()
        outcome = self.model.enter_pin(split_args(args)[0])
        if outcome is None:
            return Reply()
        if outcome == "puk":
            return cme(self.model, CME_SIM_PUK_REQUIRED)
        if outcome == "not needed":
            return cme(self.model, CME_OPERATION_NOT_ALLOWED)
        return cme(self.model, CME_INCORRECT_PASSWORD)

    def _ident(self, value: str) -> Callable[[str, str], Reply]:
        """Handler for identification commands answering `value` on execution."""

        def handler(op: str, _args: str) -> Reply:
            return Reply(lines=[value]) if op == "exec" else Reply() if op == "test" else Reply(final="ERROR")

        return handler

    def _identity(self, key: str) -> Callable[[str, str], Reply]:
        """Handler for AT+CGSN / AT+CIMI: the current `imei` / `imsi` knob on execution."""

        def handler(op: str, _args: str) -> Reply:
            if op == "exec":
                return Reply(lines=[str(getattr(self.model.behaviour, key))])
            return Reply() if op == "test" else Reply(final="ERROR")

        return handler

    def _ccid(self, op: str, args: str) -> Reply:
        """AT+CCID / AT^ICCID?: the SIM's ICCID as `+CCID: <iccid>` (readable even while the SIM is locked)."""
        if op == "test":
            return Reply()
        if op == "set":
            return Reply(final="ERROR")
        return Reply(lines=[f"+CCID: {self.model.behaviour.iccid}"])

    def _gcap(self, op: str, args: str) -> Reply:
        """+GCAP: GSM capable."""
        return Reply(lines=["+GCAP: +CGSM"]) if op == "exec" else Reply()

    def _cops(self, op: str, args: str) -> Reply:
        """+COPS: the simulated operator while registered."""
        if op == "read":
            if self.model.behaviour.registered and self.model.sim_status == SIM_READY:
                return Reply(lines=[f'+COPS: 0,0,"{OPERATOR}",0'])
            return Reply(lines=["+COPS: 0"])
        if op == "test":
            return Reply(lines=[f'+COPS: (2,"{OPERATOR}","SIM","{OPERATOR_NUMERIC}",0),,(0-4),(0-2)'])
        return Reply()

    def _creg(self, name: str) -> Callable[[str, str], Reply]:
        """Handler for +CREG/+CGREG: registration follows the `registered` knob."""

        def handler(op: str, args: str) -> Reply:
            session = self.model.session
            if op == "read":
                # 0: a locked SIM cannot attach; 2: not registered, searching.
                stat = 0 if self.model.sim_status != SIM_READY else 1 if self.model.behaviour.registered else 2
                return Reply(lines=[f"{name}: {session.creg_n},{stat}"])
            if op == "test":
                return Reply(lines=[f"{name}: (0-2)"])
            if op == "set":
                session.creg_n = int(split_args(args)[0] or "0")
            return Reply()

        return handler

    def _csq(self, op: str, args: str) -> Reply:
        """+CSQ: the `signal` knob (99 when unregistered)."""
        if op == "test":
            return Reply(lines=["+CSQ: (0-31,99),(0-7,99)"])
        signal = self.model.behaviour.signal if self.model.behaviour.registered else 99
        return Reply(lines=[f"+CSQ: {signal},99"])

    def _cbc(self, op: str, args: str) -> Reply:
        """+CBC: the `battery` knob."""
        if op == "test":
            return Reply(lines=["+CBC: (0-3),(0-100)"])
        return Reply(lines=[f"+CBC: 0,{self.model.behaviour.battery}"])

    def _cnum(self, op: str, args: str) -> Reply:
        """+CNUM: the SIM's own number."""
        if op != "exec":
            return Reply()
        number = self.model.own_number
        if not number:
            return Reply()
        toa = 145 if number.startswith("+") else 129
        return Reply(lines=[f'+CNUM: "","{number}",{toa}'])

    def _cscs(self, op: str, args: str) -> Reply:
        """+CSCS: TE character set (recorded; PDU mode does not depend on it)."""
        session = self.model.session
        if op == "read":
            return Reply(lines=[f'+CSCS: "{session.cscs}"'])
        if op == "test":
            return Reply(lines=['+CSCS: ("GSM","UCS2","IRA","8859-1")'])
        if op == "set":
            value = split_args(args)[0].upper()
            if value not in ("GSM", "UCS2", "IRA", "8859-1"):
                return cme(self.model, CME_NOT_SUPPORTED)
            session.cscs = value
        return Reply()

    def _cusd(self, op: str, args: str) -> Reply:
        """AT+CUSD=<n>[,<str>[,<dcs>]]: with a request string, OK then the network's answer as a URC:
        `+CUSD: 0,"<hex>",<dcs>` for a code in the `ussd` knob, `+CUSD: 4` (not supported) otherwise."""
        if op == "read":
            return Reply(lines=["+CUSD: 0"])
        if op == "test":
            return Reply(lines=["+CUSD: (0-2)"])
        if op != "set":
            return Reply()
        values = split_args(args)
        if values[0] not in ("0", "1", "2"):
            return cme(self.model, CME_INVALID_PARAM)
        if len(values) < 2 or not values[1] or values[0] == "2":
            return Reply()  # only sets the presentation (or cancels the session)
        return self._ussd_request(values[1])

    def _ussd_request(self, code: str) -> Reply:
        """Answer a USSD request string from the `ussd` knob (see _cusd)."""
        behaviour = self.model.behaviour
        if not behaviour.registered:
            return cme(self.model, CME_NO_NETWORK)
        answer = next((behaviour.ussd[c] for c in decode_ussd_request(code) if c in behaviour.ussd), None)
        jsonlog.event("ussd", code=code, known=answer is not None)
        if answer is None:
            return Reply(after=["+CUSD: 4"])
        # The <dcs> tells the alphabet (23.038 §5): 15 = GSM-7 (language unspecified), 72 = UCS-2.
        dcs = 15 if behaviour.ussd_encoding == "gsm7" and is_gsm7(answer) else 72
        return Reply(after=[f'+CUSD: 0,"{encode_ussd(answer, behaviour.ussd_encoding)}",{dcs}'])
