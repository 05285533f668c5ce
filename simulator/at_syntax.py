"""What every AT command of the simulated modem shares: the reply value, the `> ` prompt, argument and command
splitting (V.250), error replies and the result codes they carry."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .model import STAT_STO_UNSENT, ModemModel

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

_BASIC_COMMAND = re.compile(r"(&[A-Za-z]\d*|[Ss]\d+(=\d*|\?)?|[A-Za-z]\d*)")


@dataclass
class Reply:
    """The answer to one command: information lines, then a final result code, or a `> ` prompt."""

    lines: list[str] = field(default_factory=list)
    final: str = "OK"
    prompt: Prompt | None = None
    after: list[str] = field(default_factory=list)  # URCs written right after the final result (+CUSD)


@dataclass
class Prompt:
    """Waiting for a PDU after `AT+CMGS=<len>` / `AT+CMGW=<len>[,<stat>]`."""

    command: str
    length: int
    stat: int = STAT_STO_UNSENT
    data: bytearray = field(default_factory=bytearray)


# A handler of one extended command: (operation "exec"/"read"/"test"/"set", arguments) -> the reply.
Handler = Callable[[str, str], Reply]


def cme(model: ModemModel, code: int) -> Reply:
    """A +CME ERROR, or plain ERROR when +CMEE=0. Called with the model lock held."""
    return Reply(final=f"+CME ERROR: {code}" if model.session.cmee else "ERROR")


def cms(code: int) -> Reply:
    """A +CMS ERROR (27.005 commands report these regardless of +CMEE)."""
    return Reply(final=f"+CMS ERROR: {code}")


def simple(read: str | None, test: str | None = None) -> Handler:
    """Handler for a setting the simulator accepts and ignores: set/exec → OK, read → `read`."""

    def handler(op: str, _args: str) -> Reply:
        if op == "read":
            return Reply(lines=[read]) if read else Reply()
        if op == "test":
            return Reply(lines=[test]) if test else Reply()
        return Reply()

    return handler


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
        m = _BASIC_COMMAND.match(text[i:])
        if not m:
            raise ValueError(f"cannot parse {text[i:]!r}")
        cmds.append(m.group(0))
        i += len(m.group(0))
    return cmds
