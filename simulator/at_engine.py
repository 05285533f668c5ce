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

from . import jsonlog
from .at_device import DeviceCommands
from .at_sms import SmsCommands
from .at_syntax import (
    CME_INVALID_PARAM,
    CME_SIM_PIN_REQUIRED,
    CME_SIM_PUK_REQUIRED,
    CMS_OPERATION_NOT_ALLOWED,
    Handler,
    Prompt,
    Reply,
    cme,
    cms,
    split_commands,
)
from .model import SIM_PIN, SIM_READY, ModemModel, ReportRequest

CTRL_Z = 0x1A
ESC = 0x1B
MAX_LINE = 4096  # a longer "line" is garbage; drop it rather than grow without bound

# Commands that need an unlocked SIM (SIM data, SMS service, USSD): +CME ERROR: 11 / 12 while locked.
SIM_COMMANDS = frozenset({"+CMGS", "+CMGW", "+CMGR", "+CMGL", "+CMGD", "+CPMS", "+CSCA", "+CNUM", "+CIMI", "+CUSD"})
# The 27.005 message commands exist here in PDU mode only; in text mode (after a reboot) they are refused.
PDU_ONLY_COMMANDS = frozenset({"+CMGS", "+CMGW", "+CMGR", "+CMGL"})

# Unsolicited lines a real (Huawei-style) modem drops into its output; the `noise` fault interleaves them.
NOISE_LINES = ("^RSSI: 17", "^BOOT:20952483,0,0,0,72", "RING", "+CREG: 1", "^MODE: 5,4")

_EXT_NAME = re.compile(r"[+^$%*#][A-Za-z0-9]+")


class AtEngine:
    """Interprets the byte stream a client writes to the modem and answers it through `write`: framing, command
    dispatch, reply timing and noise; the commands themselves are :class:`DeviceCommands` (27.007) and
    :class:`SmsCommands` (27.005)."""

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
        self._prompt: Prompt | None = None
        self._boots_seen = model.boots  # a reboot (model.boots changes) drops the half-typed line and prompt
        self._device = DeviceCommands(model)
        self._sms = SmsCommands(model)
        self._handlers: dict[str, Handler] = {
            "+CLAC": self._clac,
            **self._device.handlers(),
            **self._sms.handlers(),
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

    def _finish_prompt(self, prompt: Prompt) -> None:
        """Answer the PDU typed after `> ` (see SmsCommands.finish_prompt)."""
        answer = self._sms.finish_prompt(prompt)
        self._respond([answer.reply], extra_delay_s=answer.extra_delay_s)
        if answer.report is not None:
            # Scheduled only once the +CMGS answer is out, so a report can never overtake it.
            self._schedule_report(answer.report)

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
                return cme(self.model, CME_INVALID_PARAM)
        return self._basic(cmd.upper())

    def _refusal(self, name: str, op: str) -> Reply | None:
        """The error a command gets from the SIM lock or text mode, or None when it may run."""
        status = self.model.sim_status
        if name in SIM_COMMANDS and status != SIM_READY and op != "test":
            return cme(self.model, CME_SIM_PIN_REQUIRED if status == SIM_PIN else CME_SIM_PUK_REQUIRED)
        if name in PDU_ONLY_COMMANDS and self.model.session.cmgf == 1 and op == "set":
            return cms(CMS_OPERATION_NOT_ALLOWED)
        return None

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
            return Reply(lines=self._device.identification())
        if letter in ("V", "Q", "X", "L", "M", "H", "&C", "&D", "&K", "&W", "&V"):
            return Reply()
        if letter == "S":
            return Reply(lines=["000"]) if cmd.endswith("?") else Reply()
        return Reply(final="ERROR")

    def _clac(self, op: str, args: str) -> Reply:
        """+CLAC: one supported command per line; leaves out ^CVOICE/+WIND/+ZPAS so the library treats the
        simulator as a generic modem, and includes +CSCS (needed for UCS-2 sends)."""
        if op != "exec":
            return Reply()
        basic = ["ATE", "ATI", "ATZ", "AT&F", "ATV", "ATQ"]
        return Reply(lines=basic + [f"AT{name}" for name in self._handlers])
