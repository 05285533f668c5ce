"""The AT command interpreter of the simulated modem (3GPP 27.007 / 27.005, PDU mode).

Input arrives in chunks from the pty reader thread; commands are framed by CR, the PDU after a `> ` prompt by
Ctrl-Z (0x1A, submit) or Esc (0x1B, cancel). Every response is written in one write() so that a URC written
by another thread can only land between complete responses, never inside one.

Framing follows V.250 verbose mode: information text `\r\n<line>\r\n` (consecutive lines of one command, e.g.
a +CMGR header and its PDU, separated by exactly one CR LF), final result `\r\nOK\r\n`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from modem_worker.sms_text import is_gsm7

from . import jsonlog
from .identity import decode_ussd_request, encode_ussd
from .model import (
    CMS_MEMORY_FULL,
    CMS_NO_NETWORK,
    MEMORIES,
    SIM_PIN,
    SIM_READY,
    STAT_REC_READ,
    STAT_REC_UNREAD,
    STAT_STO_SENT,
    STAT_STO_UNSENT,
    STORE_MEMORIES,
    ModemModel,
    ReportRequest,
    SimFullError,
)
from .pdu import PduError, decode_pdu

CTRL_Z = 0x1A
ESC = 0x1B
MAX_LINE = 4096  # a longer "line" is garbage; drop it rather than grow without bound

CMS_INVALID_PDU = 304
CMS_INVALID_INDEX = 321
CMS_OPERATION_NOT_ALLOWED = 302
CMS_NOT_SUPPORTED = 303
CME_OPERATION_NOT_ALLOWED = 3
CME_NOT_SUPPORTED = 4
CME_SIM_PIN_REQUIRED = 11
CME_SIM_PUK_REQUIRED = 12
CME_INCORRECT_PASSWORD = 16
CME_NO_NETWORK = 30
CME_INVALID_PARAM = 50

# Commands that need an unlocked SIM (SIM data, SMS service, USSD): +CME ERROR: 11 / 12 while locked.
SIM_COMMANDS = frozenset({"+CMGS", "+CMGW", "+CMGR", "+CMGL", "+CMGD", "+CPMS", "+CSCA", "+CNUM", "+CIMI", "+CUSD"})
# The 27.005 message commands exist here in PDU mode only; in text mode (after a reboot) they are refused.
PDU_ONLY_COMMANDS = frozenset({"+CMGS", "+CMGW", "+CMGR", "+CMGL"})

# Unsolicited lines a real (Huawei-style) modem drops into its output; the `noise` fault interleaves them.
NOISE_LINES = ("^RSSI: 17", "^BOOT:20952483,0,0,0,72", "RING", "+CREG: 1", "^MODE: 5,4")

MANUFACTURER = "smssync"
MODEL = "smssync-simulator"
REVISION = "1.0"
OPERATOR = "SIMULATED"
OPERATOR_NUMERIC = "64004"

_STAT_NAMES = {"REC UNREAD": 0, "REC READ": 1, "STO UNSENT": 2, "STO SENT": 3, "ALL": 4}
_EXT_NAME = re.compile(r"[+^$%*#][A-Za-z0-9]+")


@dataclass
class Reply:
    """The answer to one command: information lines, then a final result code, or a `> ` prompt."""

    lines: list[str] = field(default_factory=list)
    final: str = "OK"
    prompt: _Prompt | None = None
    after: list[str] = field(default_factory=list)  # URCs written right after the final result (+CUSD)


@dataclass
class _Prompt:
    """Waiting for a PDU after `AT+CMGS=<len>` / `AT+CMGW=<len>[,<stat>]`."""

    command: str
    length: int
    stat: int = STAT_STO_UNSENT
    data: bytearray = field(default_factory=bytearray)


def split_args(text: str) -> list[str]:
    """Split an AT parameter list on commas outside double quotes; strip blanks and the quotes."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    out.append("".join(current).strip())
    return out


def split_commands(body: str) -> list[str]:
    """Split what follows "AT" into single commands: basic ones (E0, V1, &F, S0=0, Z, I) and extended ones
    (+XXX... up to ';'). Blanks outside quotes are ignored as V.250 says.

    Raises ValueError on a character that starts no command.
    """
    compact: list[str] = []
    quoted = False
    for ch in body:
        if ch == '"':
            quoted = not quoted
        if ch == " " and not quoted:
            continue
        compact.append(ch)
    text = "".join(compact)
    cmds: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ";":
            i += 1
            continue
        if ch in "+^$%*#":
            j, quoted = i, False
            while j < len(text) and (text[j] != ";" or quoted):
                if text[j] == '"':
                    quoted = not quoted
                j += 1
            cmds.append(text[i:j])
            i = j
            continue
        m = re.match(r"(&[A-Za-z]\d*|[Ss]\d+(=\d*|\?)?|[A-Za-z]\d*)", text[i:])
        if not m:
            raise ValueError(f"cannot parse {text[i:]!r}")
        cmds.append(m.group(0))
        i += len(m.group(0))
    return cmds


class AtEngine:
    """Interprets the byte stream a client writes to the modem and answers it through `write`."""

    def __init__(
        self,
        model: ModemModel,
        write: Callable[[bytes], bool],
        abort: threading.Event,
        schedule_report: Callable[[ReportRequest], None],
    ) -> None:
        """Bind the engine to a model, the pty writer, an event that cuts delays short (unplug/stop), and the
        scheduler for status reports."""
        self.model = model
        self._write = write
        self._abort = abort
        self._schedule_report = schedule_report
        self._line = bytearray()
        self._prompt: _Prompt | None = None
        self._boots_seen = model.boots  # a reboot (model.boots changes) drops the half-typed line and prompt
        self._handlers: dict[str, Callable[[str, str], Reply]] = {
            "+CFUN": self._cfun,
            "+CMEE": self._cmee,
            "+CPIN": self._cpin,
            "+CLAC": self._clac,
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
            "+CMGF": self._cmgf,
            "+CSCA": self._csca,
            "+CSMP": self._simple("+CSMP: 49,167,0,0"),
            "+CSMS": self._csms,
            "+CPMS": self._cpms,
            "+CNMI": self._cnmi,
            "+CNMA": self._simple(None),
            "+CMGR": self._cmgr,
            "+CMGL": self._cmgl,
            "+CMGD": self._cmgd,
            "+CMGS": self._cmgs,
            "+CMGW": self._cmgw,
            "+CLIP": self._simple("+CLIP: 1,1"),
            "+CRC": self._simple("+CRC: 1"),
            "+CVHU": self._simple("+CVHU: 0"),
            "+IFC": self._simple("+IFC: 2,2", "+IFC: (0-2),(0-2)"),
            "+CMMS": self._simple("+CMMS: 0", "+CMMS: (0-2)"),
            "+CUSD": self._cusd,
        }

    # --- input framing ------------------------------------------------------------------------------------------

    def reset_input(self) -> None:
        """Forget a half-typed command line and a pending `> ` prompt (hang ended, modem rebooted)."""
        self._line.clear()
        self._prompt = None

    def feed(self, data: bytes) -> None:
        """Consume bytes from the client: complete command lines and prompted PDUs are executed in order."""
        for byte in data:
            if self._boots_seen != self.model.boots:
                # The modem rebooted: what was typed before (a pending AT+CMGS too) died with its RAM.
                self._boots_seen = self.model.boots
                self.reset_input()
            if self._prompt is not None:
                self._feed_prompt(byte)
            elif byte == 0x0D:
                line = self._line.decode("latin-1").strip()
                self._line.clear()
                if line:
                    self._execute_line(line)
                    self._deliver_pending()
            elif byte == 0x0A:
                continue  # CR terminates; an LF after it (or before a command) is noise
            elif byte in (CTRL_Z, ESC):
                # A PDU whose prompt was lost (the modem rebooted meanwhile) ends here: drop it, so that the
                # next command is not glued to it.
                if self._line:
                    jsonlog.event("stray_input_dropped", bytes=len(self._line))
                self._line.clear()
            elif byte == 0x08:
                del self._line[-1:]
            elif len(self._line) < MAX_LINE:
                self._line.append(byte)
            else:
                jsonlog.event("line_overflow_dropped", bytes=len(self._line))
                self._line.clear()

    def _deliver_pending(self) -> None:
        """Let SMS waiting in the network arrive once a command freed storage or unlocked the SIM."""
        with self.model.lock:
            urcs = self.model.deliver_pending() if self.model.network_pending else []
        if urcs:
            self._write(b"".join(urcs))

    def _feed_prompt(self, byte: int) -> None:
        """One byte of PDU input after a `> ` prompt."""
        prompt = self._prompt
        assert prompt is not None
        if byte == CTRL_Z:
            self._prompt = None
            self._finish_prompt(prompt)
        elif byte == ESC:
            self._prompt = None
            jsonlog.event("pdu_cancelled", command=prompt.command)
            self._respond([Reply()])
        elif byte in (0x0D, 0x0A):
            return
        elif len(prompt.data) < MAX_LINE:
            prompt.data.append(byte)

    # --- execution ----------------------------------------------------------------------------------------------

    def _execute_line(self, line: str) -> None:
        """Run one command line (possibly several commands joined by ';') and write the whole answer."""
        with self.model.lock:
            self.model.at_log.append(line)
            echo = self.model.session.echo
        jsonlog.event("at_command", level=logging.DEBUG, command=line)
        if echo:
            self._write(line.encode("latin-1") + b"\r")
        if line[:2].upper() != "AT":
            return  # a modem ignores anything that does not start with AT
        body = line[2:]
        if body.startswith("/"):
            return
        try:
            commands = split_commands(body)
        except ValueError:
            self._respond([Reply(final="ERROR")])
            return
        replies: list[Reply] = []
        for cmd in commands:
            try:
                with self.model.lock:
                    reply = self._dispatch(cmd)
            except Exception:  # a bug in one handler must answer ERROR, not leave the client waiting
                jsonlog.log.exception("at_handler_error", extra={"command": cmd})
                reply = Reply(final="ERROR")
            replies.append(reply)
            if reply.final != "OK" or reply.prompt is not None:
                break
        self._respond(replies or [Reply()])  # a bare "AT" is just OK

    def _respond(self, replies: list[Reply], extra_delay_s: float = 0.0) -> None:
        """Write information text of all replies plus the last reply's final result (or the prompt), after
        the configured reply delay; with the `noise` fault on, unsolicited lines land between lines."""
        lines = [line for r in replies for line in r.lines]
        last = replies[-1]
        if last.prompt is not None:
            self._prompt = last.prompt
            # The prompt is not a final result: it comes without the reply delay, and never with noise.
            info = "\r\n" + "\r\n".join(lines) + "\r\n" if lines else ""
            self._write((info + "\r\n> ").encode("latin-1"))
            return
        with self.model.lock:
            delay = self.model.behaviour.reply_delay_s + extra_delay_s
            boots = self.model.boots
            text = self._frame(lines, last.final)
        if delay > 0 and self._abort.wait(delay):
            return  # unplugged or stopped while "busy": the answer is lost, as with a real modem
        if boots != self.model.boots:
            return  # rebooted while "busy": the answer is lost too
        self._write(text.encode("latin-1"))
        if last.after:
            self._write("".join(f"\r\n{u}\r\n" for u in last.after).encode("latin-1"))

    def _frame(self, lines: list[str], final: str) -> str:
        """V.250 framing of information lines and the final result; noise lines (the `noise` fault) are put at
        random line boundaries, each as a complete `\r\n<line>\r\n`. Called with the model lock held."""
        behaviour = self.model.behaviour
        segments = [("\r\n" if i == 0 else "") + line + "\r\n" for i, line in enumerate(lines)]
        segments.append(f"\r\n{final}\r\n")
        if not behaviour.noise:
            return "".join(segments)
        rng = self.model.noise_rng
        out: list[str] = []
        for segment in segments:  # a boundary before every line and before the final result
            if rng.random() < behaviour.noise_rate:
                out.append(f"\r\n{rng.choice(NOISE_LINES)}\r\n")
            out.append(segment)
        return "".join(out)

    def _dispatch(self, cmd: str) -> Reply:
        """Run a single command (without the AT prefix). Called with the model lock held."""
        if cmd[0] in "+^$%*#":
            m = _EXT_NAME.match(cmd)
            if not m:
                return Reply(final="ERROR")
            name = m.group(0).upper()
            rest = cmd[m.end() :]
            if rest == "":
                op, args = "exec", ""
            elif rest == "?":
                op, args = "read", ""
            elif rest == "=?":
                op, args = "test", ""
            elif rest.startswith("="):
                op, args = "set", rest[1:]
            else:
                return Reply(final="ERROR")
            handler = self._handlers.get(name)
            # An unknown command is an ERROR; a known one may be refused (SIM locked, text mode).
            refusal = Reply(final="ERROR") if handler is None else self._refusal(name, op)
            if refusal is not None or handler is None:
                return refusal if refusal is not None else Reply(final="ERROR")
            try:
                return handler(op, args)
            except (ValueError, IndexError):
                return self._cme(CME_INVALID_PARAM)
        return self._basic(cmd.upper())

    def _refusal(self, name: str, op: str) -> Reply | None:
        """The error a command gets from the SIM lock or text mode, or None when it may run."""
        status = self.model.sim_status
        if name in SIM_COMMANDS and status != SIM_READY and op != "test":
            return self._cme(CME_SIM_PIN_REQUIRED if status == SIM_PIN else CME_SIM_PUK_REQUIRED)
        if name in PDU_ONLY_COMMANDS and self.model.session.cmgf == 1 and op == "set":
            return self._cms(CMS_OPERATION_NOT_ALLOWED)
        return None

    def _cme(self, code: int) -> Reply:
        """A +CME ERROR, or plain ERROR when +CMEE=0."""
        return Reply(final=f"+CME ERROR: {code}" if self.model.session.cmee else "ERROR")

    @staticmethod
    def _cms(code: int) -> Reply:
        """A +CMS ERROR (27.005 commands report these regardless of +CMEE)."""
        return Reply(final=f"+CMS ERROR: {code}")

    # --- basic (V.250) commands ---------------------------------------------------------------------------------

    def _basic(self, cmd: str) -> Reply:
        """E, V, Q, X, L, M, H, Z, I, &F, &C, &D, &K, &W and S-registers; anything else is an error."""
        session = self.model.session
        letter, digits = (cmd[:2], cmd[2:]) if cmd.startswith("&") else (cmd[:1], cmd[1:])
        if letter == "E" and digits in ("", "0", "1"):
            session.echo = digits == "1"
            return Reply()
        if letter in ("Z", "&F"):
            # Reset to the simulator's power-on profile (echo off, verbose errors).
            session.echo = False
            session.cmee = 1
            return Reply()
        if letter == "I":
            imei = self.model.behaviour.imei
            return Reply(lines=[f"{MANUFACTURER} {MODEL}", f"Revision: {REVISION}", f"IMEI: {imei}"])
        if letter in ("V", "Q", "X", "L", "M", "H", "&C", "&D", "&K", "&W", "&V"):
            return Reply()
        if letter == "S":
            return Reply(lines=["000"]) if cmd.endswith("?") else Reply()
        return Reply(final="ERROR")

    # --- extended commands --------------------------------------------------------------------------------------

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
            return self._cme(CME_INVALID_PARAM)
        if len(values) < 2 or not values[1] or values[0] == "2":
            return Reply()  # only sets the presentation (or cancels the session)
        return self._ussd_request(values[1])

    def _ussd_request(self, code: str) -> Reply:
        """Answer a USSD request string from the `ussd` knob (see _cusd)."""
        behaviour = self.model.behaviour
        if not behaviour.registered:
            return self._cme(CME_NO_NETWORK)
        answer = next((behaviour.ussd[c] for c in decode_ussd_request(code) if c in behaviour.ussd), None)
        jsonlog.event("ussd", code=code, known=answer is not None)
        if answer is None:
            return Reply(after=["+CUSD: 4"])
        # The <dcs> tells the alphabet (23.038 §5): 15 = GSM-7 (language unspecified), 72 = UCS-2.
        dcs = 15 if behaviour.ussd_encoding == "gsm7" and is_gsm7(answer) else 72
        return Reply(after=[f'+CUSD: 0,"{encode_ussd(answer, behaviour.ussd_encoding)}",{dcs}'])

    def _simple(self, read: str | None, test: str | None = None) -> Callable[[str, str], Reply]:
        """Handler for a setting the simulator accepts and ignores: set/exec → OK, read → `read`."""

        def handler(op: str, _args: str) -> Reply:
            if op == "read":
                return Reply(lines=[read]) if read else Reply()
            if op == "test":
                return Reply(lines=[test]) if test else Reply()
            return Reply()

        return handler

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
                return self._cme(CME_INVALID_PARAM)
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
            return self._cme(CME_SIM_PUK_REQUIRED)
        if outcome == "not needed":
            return self._cme(CME_OPERATION_NOT_ALLOWED)
        return self._cme(CME_INCORRECT_PASSWORD)

    def _clac(self, op: str, args: str) -> Reply:
        """+CLAC: one supported command per line; leaves out ^CVOICE/+WIND/+ZPAS so the library treats the
        simulator as a generic modem, and includes +CSCS (needed for UCS-2 sends)."""
        if op != "exec":
            return Reply()
        basic = ["ATE", "ATI", "ATZ", "AT&F", "ATV", "ATQ"]
        return Reply(lines=basic + [f"AT{name}" for name in self._handlers])

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
                return self._cme(CME_NOT_SUPPORTED)
            session.cscs = value
        return Reply()

    def _cmgf(self, op: str, args: str) -> Reply:
        """+CMGF: PDU mode only; text mode is refused with +CMS ERROR: 303."""
        if op == "read":
            return Reply(lines=[f"+CMGF: {self.model.session.cmgf}"])
        if op == "test":
            return Reply(lines=["+CMGF: (0,1)"])
        if op == "set":
            if int(args or "0") != 0:
                # Advertised for Gammu's probe, but only PDU mode is implemented.
                return self._cms(CMS_NOT_SUPPORTED)
            self.model.session.cmgf = 0
        return Reply()

    def _csca(self, op: str, args: str) -> Reply:
        """+CSCA: the SMSC number (settable)."""
        session = self.model.session
        if op == "read":
            toa = 145 if session.smsc.startswith("+") else 129
            return Reply(lines=[f'+CSCA: "{session.smsc}",{toa}'])
        if op == "set":
            session.smsc = split_args(args)[0]
        return Reply()

    def _csms(self, op: str, args: str) -> Reply:
        """+CSMS: phase 2+ message service."""
        if op == "test":
            return Reply(lines=["+CSMS: (0,1)"])
        if op == "read":
            return Reply(lines=["+CSMS: 0,1,1,1"])
        if op == "set":
            return Reply(lines=["+CSMS: 1,1,1"])
        return Reply()

    def _memory_counts(self, memories: list[str]) -> str:
        """`used,total` pairs for +CPMS answers (a full `storage` fault shows SM/ME as used = total)."""
        return ",".join(f"{self.model.used_slots(m)},{self.model.capacities[m]}" for m in memories)

    def _cpms(self, op: str, args: str) -> Reply:
        """+CPMS: select memories; <mem1> (read/delete) may be SM, ME or SR, <mem2> (write) and <mem3> (where
        the network's SMS are stored) SM or ME."""
        session = self.model.session
        if op == "test":
            return Reply(lines=['+CPMS: ("SM","ME","SR"),("SM","ME"),("SM","ME")'])
        if op == "read":
            selected = (session.mem_read, session.mem_write, session.mem_store)
            parts = [f'"{m}",{self._memory_counts([m])}' for m in selected]
            return Reply(lines=["+CPMS: " + ",".join(parts)])
        if op == "set":
            mems = [m.upper() for m in split_args(args)]
            if not 1 <= len(mems) <= 3 or mems[0] not in MEMORIES or any(m not in STORE_MEMORIES for m in mems[1:]):
                return self._cms(CMS_OPERATION_NOT_ALLOWED)
            session.mem_read = mems[0]
            if len(mems) > 1:
                session.mem_write = mems[1]
            if len(mems) > 2:
                session.mem_store = mems[2]
            counts = self._memory_counts([session.mem_read, session.mem_write, session.mem_store])
            return Reply(lines=["+CPMS: " + counts])
        return Reply(final="ERROR")

    def _cnmi(self, op: str, args: str) -> Reply:
        """+CNMI: <mt> decides +CMTI (1) / +CMT direct (2, 3) / silent store (0); <ds> +CDS (1) / +CDSI (2)."""
        session = self.model.session
        if op == "read":
            return Reply(lines=[f"+CNMI: {session.cnmi_mode},{session.cnmi_mt},0,{session.cnmi_ds},0"])
        if op == "test":
            return Reply(lines=["+CNMI: (0-3),(0-3),(0,2),(0-2),(0,1)"])
        if op == "set":
            values = [int(v) if v else 0 for v in split_args(args)]
            values += [0] * (5 - len(values))
            if not 0 <= values[1] <= 3 or not 0 <= values[3] <= 2:
                return self._cms(CMS_OPERATION_NOT_ALLOWED)
            session.cnmi_mode, session.cnmi_mt, session.cnmi_ds = values[0], values[1], values[3]
        return Reply()

    def _cmgr(self, op: str, args: str) -> Reply:
        """+CMGR=<index>: header then PDU from the read memory; an unread message becomes read."""
        if op == "test":
            return Reply()
        if op != "set":
            return Reply(final="ERROR")
        index = int(args)
        record = self.model.memories[self.model.session.mem_read].get(index)
        if record is None:
            return self._cms(CMS_INVALID_INDEX)
        stat = record.stat
        if record.stat == STAT_REC_UNREAD:
            record.stat = STAT_REC_READ
        return Reply(lines=[f"+CMGR: {stat},,{record.tpdu_length}", record.pdu])

    def _cmgl(self, op: str, args: str) -> Reply:
        """+CMGL=<stat>: list the read memory (4 or "ALL" = everything); unread ones become read."""
        if op == "test":
            return Reply(lines=["+CMGL: (0-4)"])
        raw = split_args(args)[0].upper() if args else "0"
        wanted = _STAT_NAMES[raw] if raw in _STAT_NAMES else int(raw)
        if not 0 <= wanted <= 4:
            return self._cms(CMS_OPERATION_NOT_ALLOWED)
        lines: list[str] = []
        for index, record in sorted(self.model.memories[self.model.session.mem_read].items()):
            if wanted not in (4, record.stat):
                continue
            lines += [f"+CMGL: {index},{record.stat},,{record.tpdu_length}", record.pdu]
            if record.stat == STAT_REC_UNREAD:
                record.stat = STAT_REC_READ
        return Reply(lines=lines)

    def _cmgd(self, op: str, args: str) -> Reply:
        """+CMGD=<index>[,<flag>]: delete one message, or by status with flags 1-4."""
        memory = self.model.memories[self.model.session.mem_read]
        if op == "test":
            return Reply(lines=[f"+CMGD: ({','.join(str(i) for i in sorted(memory))}),(0-4)"])
        if op != "set":
            return Reply(final="ERROR")
        values = split_args(args)
        index = int(values[0]) if values[0] else 0
        flag = int(values[1]) if len(values) > 1 and values[1] else 0
        if flag == 0:
            if not 1 <= index <= self.model.capacities[self.model.session.mem_read]:
                return self._cms(CMS_INVALID_INDEX)
            memory.pop(index, None)  # deleting an empty slot is not an error on common modems
        else:
            doomed = {
                1: {STAT_REC_READ},
                2: {STAT_REC_READ, STAT_STO_SENT},
                3: {STAT_REC_READ, STAT_STO_SENT, STAT_STO_UNSENT},
                4: {STAT_REC_READ, STAT_REC_UNREAD, STAT_STO_SENT, STAT_STO_UNSENT},
            }.get(flag)
            if doomed is None:
                return self._cms(CMS_OPERATION_NOT_ALLOWED)
            for i in [i for i, r in memory.items() if r.stat in doomed]:
                del memory[i]
        jsonlog.event("sms_deleted", level=logging.DEBUG, memory=self.model.session.mem_read, index=index, flag=flag)
        return Reply()

    def _cmgs(self, op: str, args: str) -> Reply:
        """+CMGS=<length>: prompt for the SMS-SUBMIT PDU."""
        if op == "test":
            return Reply()
        if op != "set":
            return Reply(final="ERROR")
        length = int(split_args(args)[0])
        if not 7 <= length <= 176:
            return self._cms(CMS_INVALID_PDU)
        return Reply(prompt=_Prompt("+CMGS", length))

    def _cmgw(self, op: str, args: str) -> Reply:
        """+CMGW=<length>[,<stat>]: prompt for a PDU to store in SM."""
        if op == "test":
            return Reply()
        if op != "set":
            return Reply(final="ERROR")
        values = split_args(args)
        length = int(values[0])
        stat = int(values[1]) if len(values) > 1 and values[1] else STAT_STO_UNSENT
        if not 1 <= length <= 176 or stat not in (0, 1, 2, 3):
            return self._cms(CMS_INVALID_PDU)
        return Reply(prompt=_Prompt("+CMGW", length, stat))

    # --- PDU after the prompt -----------------------------------------------------------------------------------

    def _finish_prompt(self, prompt: _Prompt) -> None:
        """Handle the PDU typed after `> `: send it (CMGS) or store it (CMGW)."""
        pdu_hex = prompt.data.decode("latin-1").strip()
        try:
            sms = decode_pdu(pdu_hex)
        except PduError as exc:
            jsonlog.event("pdu_rejected", command=prompt.command, error=str(exc), pdu=pdu_hex[:400])
            self._respond([self._cms(CMS_INVALID_PDU)])
            return
        if sms.tpdu_length != prompt.length:
            jsonlog.event(
                "pdu_rejected",
                command=prompt.command,
                error="length mismatch",
                declared=prompt.length,
                actual=sms.tpdu_length,
            )
            self._respond([self._cms(CMS_INVALID_PDU)])
            return
        if prompt.command == "+CMGW":
            try:
                index = self.model.store_written(sms, pdu_hex.upper(), prompt.stat)
            except SimFullError:
                self._respond([self._cms(CMS_MEMORY_FULL)])
                return
            self._respond([Reply(lines=[f"+CMGW: {index}"])])
            return
        if sms.type != "submit":
            self._respond([self._cms(CMS_INVALID_PDU)])
            return
        report: ReportRequest | None = None
        with self.model.lock:
            behaviour = self.model.behaviour
            send_delay = behaviour.send_delay_s
            refusal = self.model.send_refusal(sms.address)
            if not behaviour.registered:
                reply = self._cms(CMS_NO_NETWORK)
            elif refusal is not None:
                reply = self._cms(refusal)
                jsonlog.event("send_refused", to=sms.address, cms_error=refusal)
            elif behaviour.fail_sends > 0:
                behaviour.fail_sends -= 1
                reply = self._cms(behaviour.cms_error)
                jsonlog.event(
                    "send_failed", to=sms.address, cms_error=behaviour.cms_error, remaining=behaviour.fail_sends
                )
            else:
                mr, report = self.model.submit(sms)
                self.model.count_sent()
                reply = Reply(lines=[f"+CMGS: {mr}"])
        self._respond([reply], extra_delay_s=send_delay)
        if report is not None:
            # Scheduled only once the +CMGS answer is out, so a report can never overtake it.
            self._schedule_report(report)
