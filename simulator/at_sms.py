"""The SMS commands of the simulated modem (27.005 in PDU mode): message format, SMSC, memories, new-message
indications, reading, listing, deleting, and sending or storing the PDU typed after the `> ` prompt."""

from __future__ import annotations

import logging
from typing import NamedTuple

from . import jsonlog
from .at_syntax import (
    CMS_INVALID_INDEX,
    CMS_INVALID_PDU,
    CMS_NOT_SUPPORTED,
    CMS_OPERATION_NOT_ALLOWED,
    Handler,
    Prompt,
    Reply,
    cms,
    simple,
    split_args,
)
from .model import (
    CMS_MEMORY_FULL,
    CMS_NO_NETWORK,
    MEMORIES,
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

_STAT_NAMES = {"REC UNREAD": 0, "REC READ": 1, "STO UNSENT": 2, "STO SENT": 3, "ALL": 4}


class PromptAnswer(NamedTuple):
    """What the PDU typed after `> ` gets: the reply, the extra delay before it (the `send_delay_s` knob) and the
    status report to schedule once the reply is out (None: no report)."""

    reply: Reply
    extra_delay_s: float = 0.0
    report: ReportRequest | None = None


class SmsCommands:
    """The 27.005 handlers over one model; every handler runs with the model lock held."""

    def __init__(self, model: ModemModel) -> None:
        """Bind the handlers to ``model``."""
        self.model = model

    def handlers(self) -> dict[str, Handler]:
        """The extended commands this class answers, by name."""
        return {
            "+CMGF": self._cmgf,
            "+CSCA": self._csca,
            "+CSMP": simple("+CSMP: 49,167,0,0"),
            "+CSMS": self._csms,
            "+CPMS": self._cpms,
            "+CNMI": self._cnmi,
            "+CNMA": simple(None),
            "+CMGR": self._cmgr,
            "+CMGL": self._cmgl,
            "+CMGD": self._cmgd,
            "+CMGS": self._cmgs,
            "+CMGW": self._cmgw,
        }

    def _cmgf(self, op: str, args: str) -> Reply:
        """+CMGF: PDU mode only; text mode is refused with +CMS ERROR: 303."""
        if op == "read":
            return Reply(lines=[f"+CMGF: {self.model.session.cmgf}"])
        if op == "test":
            return Reply(lines=["+CMGF: (0,1)"])
        if op == "set":
            if int(args or "0") != 0:
                # Advertised for Gammu's probe, but only PDU mode is implemented.
                return cms(CMS_NOT_SUPPORTED)
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
                return cms(CMS_OPERATION_NOT_ALLOWED)
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
                return cms(CMS_OPERATION_NOT_ALLOWED)
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
            return cms(CMS_INVALID_INDEX)
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
            return cms(CMS_OPERATION_NOT_ALLOWED)
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
                return cms(CMS_INVALID_INDEX)
            memory.pop(index, None)  # deleting an empty slot is not an error on common modems
        else:
            doomed = {
                1: {STAT_REC_READ},
                2: {STAT_REC_READ, STAT_STO_SENT},
                3: {STAT_REC_READ, STAT_STO_SENT, STAT_STO_UNSENT},
                4: {STAT_REC_READ, STAT_REC_UNREAD, STAT_STO_SENT, STAT_STO_UNSENT},
            }.get(flag)
            if doomed is None:
                return cms(CMS_OPERATION_NOT_ALLOWED)
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
            return cms(CMS_INVALID_PDU)
        return Reply(prompt=Prompt("+CMGS", length))

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
            return cms(CMS_INVALID_PDU)
        return Reply(prompt=Prompt("+CMGW", length, stat))

    # --- PDU after the prompt -----------------------------------------------------------------------------------

    def finish_prompt(self, prompt: Prompt) -> PromptAnswer:
        """Handle the PDU typed after `> `: send it (CMGS) or store it (CMGW). Takes the model lock itself."""
        pdu_hex = prompt.data.decode("latin-1").strip()
        try:
            sms = decode_pdu(pdu_hex)
        except PduError as exc:
            jsonlog.event("pdu_rejected", command=prompt.command, error=str(exc), pdu=pdu_hex[:400])
            return PromptAnswer(cms(CMS_INVALID_PDU))
        if sms.tpdu_length != prompt.length:
            jsonlog.event(
                "pdu_rejected",
                command=prompt.command,
                error="length mismatch",
                declared=prompt.length,
                actual=sms.tpdu_length,
            )
            return PromptAnswer(cms(CMS_INVALID_PDU))
        if prompt.command == "+CMGW":
            try:
                index = self.model.store_written(sms, pdu_hex.upper(), prompt.stat)
            except SimFullError:
                return PromptAnswer(cms(CMS_MEMORY_FULL))
            return PromptAnswer(Reply(lines=[f"+CMGW: {index}"]))
        if sms.type != "submit":
            return PromptAnswer(cms(CMS_INVALID_PDU))
        report: ReportRequest | None = None
        with self.model.lock:
            behaviour = self.model.behaviour
            send_delay = behaviour.send_delay_s
            refusal = self.model.send_refusal(sms.address)
            if not behaviour.registered:
                reply = cms(CMS_NO_NETWORK)
            elif refusal is not None:
                reply = cms(refusal)
                jsonlog.event("send_refused", to=sms.address, cms_error=refusal)
            elif behaviour.fail_sends > 0:
                behaviour.fail_sends -= 1
                reply = cms(behaviour.cms_error)
                jsonlog.event(
                    "send_failed", to=sms.address, cms_error=behaviour.cms_error, remaining=behaviour.fail_sends
                )
            else:
                mr, report = self.model.submit(sms)
                self.model.count_sent()
                reply = Reply(lines=[f"+CMGS: {mr}"])
        return PromptAnswer(reply, send_delay, report)
