"""``?task=sent`` (Message Results API): the claims a server confirms are sent, the ones it explicitly does not
echo are released, and the ones without a usable answer stay claimed and are confirmed again on later polls.

No usable answer (time-out, dropped connection, 5xx, unreadable body) is not a "no": the server may have
processed the POST and dropped the uuids from its outbox, so releasing them could lose the SMS. A 3xx/4xx (but
408/429, which say "later") is a refusal before any work (auth, wrong URL): first-time claims are released;
claims being retried are kept, since their earlier POST may have been processed and the server may never offer
them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from services.ledger import Ledger
from services.sync_protocol import ReplyError, TaskMessage, clip, parse_message_uuids
from task_poller import metrics
from task_poller.sync_http import PollError, TaskRequests

# The poller's logger: these lines are part of its log, under the name operators filter on.
log = logging.getLogger("task_poller.poller")

# ?task=sent tries for a uuid the server offers again although it is queued here (see ``reconfirm``), per process:
# bounded, so a server that keeps offering a uuid whatever it is told costs a few POSTs, not one per poll forever.
RECONFIRM_TRIES = 3
MAX_RECONFIRMED = 10_000  # uuids whose re-confirmation is remembered (oldest forgotten first)


class SentConfirmer:
    """Confirms one endpoint's claims through ``?task=sent`` and remembers the ones still unconfirmed."""

    def __init__(
        self,
        endpoint_name: str,
        requests: TaskRequests,
        ledger: Ledger,
        key: Callable[[str], str],
        results_setting: str,
    ) -> None:
        """``key`` maps a uuid to its ledger key; ``results_setting`` is the setting that turns the Message
        Results API off, named in the errors (``SMSGW_MESSAGE_RESULTS=false`` or the fleet file's key)."""
        self._name = endpoint_name
        self._requests = requests
        self._ledger = ledger
        self._key = key
        self._results_setting = results_setting
        # Claims whose ?task=sent got no usable answer: retried first thing on each poll until the server
        # answers, or until they are republished as orphans (by us or a replica) after stale_claim_s.
        self._unconfirmed: dict[str, TaskMessage] = {}
        # Re-confirmations (``reconfirm``) tried per uuid; RECONFIRM_TRIES once the server answered one (ours or
        # a re-confirmation): a server that offers a uuid again after that is not told again.
        self._reconfirmed: dict[str, int] = {}

    def retry_unconfirmed(self) -> list[TaskMessage]:
        """Retry ``?task=sent`` for claims an earlier poll got no usable answer for; returns the echoed ones.

        Claims no longer ``accepted`` (republished as orphans meanwhile, by us or a replica) are dropped.

        Raises:
            PollError: still no usable answer (the claims stay for the next poll or the orphan republish).
            LedgerError: the ledger could not be read.
        """
        if not self._unconfirmed:
            return []
        pending: list[TaskMessage] = []
        for message in list(self._unconfirmed.values()):
            state = self._ledger.claim_state(self._key(message.uuid))
            if state != "accepted":
                del self._unconfirmed[message.uuid]
                log.debug(
                    "endpoint %s: unconfirmed task message %s is %s now; no retry",
                    self._name,
                    message.uuid,
                    state or "released",
                )
            else:
                pending.append(message)
        if not pending:
            return []
        log.info(
            "endpoint %s: retrying ?task=sent for %d claim(s) left unconfirmed by an earlier poll",
            self._name,
            len(pending),
        )
        return self.confirm(pending)

    def reconfirm(self, offered_again: list[TaskMessage]) -> None:
        """Confirm again, with ``?task=sent``, the uuids the server offers although they are queued here.

        A poller stopped (SIGKILL, a crash) between its claim and ``?task=sent`` leaves the server without the
        confirmation: it keeps the message pending, offers it on every poll and never asks for its result,
        although the orphan republish sends it (issue 13, found by the chaos short form, seed 23). Only claims
        already ``queued`` are confirmed: they are on their way to a modem whatever the server answers; an
        ``accepted`` one may still be released by the poller that holds it (its own ``?task=sent`` refused).
        Tried at most RECONFIRM_TRIES times per uuid; a failure is one INFO line and the poll goes on.

        Raises:
            LedgerError: a claim's state could not be read.
        """
        due = [
            m
            for m in offered_again
            if m.uuid not in self._unconfirmed and self._reconfirmed.get(m.uuid, 0) < RECONFIRM_TRIES
        ]
        due = [m for m in due if self._ledger.claim_state(self._key(m.uuid)) == "queued"]
        if not due:
            return
        for message in due:
            self._note(message.uuid, self._reconfirmed.get(message.uuid, 0) + 1)
        uuids = [m.uuid for m in due]
        try:
            echoed = set(parse_message_uuids(self._requests.post_sent(uuids)))
        except (PollError, ReplyError) as exc:
            log.info(
                "endpoint %s: ?task=sent for %d message(s) offered again though queued here failed (%s); tried "
                "again on a later offer",
                self._name,
                len(uuids),
                exc,
            )
            return
        for uuid in uuids:
            self._note(uuid, RECONFIRM_TRIES)
        log.info(
            "endpoint %s: task message(s) %s offered again though queued here (a poller stopped before ?task=sent): "
            "confirmed to the server again; %d not echoed (already queued, not sent again)",
            self._name,
            ", ".join(clip(u, 80) for u in uuids),
            len(set(uuids) - echoed),
        )

    def _note(self, uuid: str, tries: int) -> None:
        """Remember ``tries`` re-confirmations of ``uuid`` (newest last; the oldest forgotten past the bound)."""
        self._reconfirmed.pop(uuid, None)
        self._reconfirmed[uuid] = tries
        while len(self._reconfirmed) > MAX_RECONFIRMED:
            del self._reconfirmed[next(iter(self._reconfirmed))]

    def confirm(self, messages: list[TaskMessage]) -> list[TaskMessage]:
        """POST ``?task=sent`` and return the messages the server echoed; release the claims it did not echo.

        Raises:
            PollError: no usable answer (see the module docstring for which claims stay and which are released).
            LedgerError: a claim could not be released.
        """
        try:
            echoed = set(parse_message_uuids(self._requests.post_sent([m.uuid for m in messages])))
        except (PollError, ReplyError) as exc:
            if (
                isinstance(exc, PollError)
                and exc.status is not None
                and 300 <= exc.status < 500
                and exc.status not in (408, 429)
            ):
                raise self._refused_before_work(exc, messages) from None
            raise self._kept_for_retry(exc, messages) from None
        confirmed: list[TaskMessage] = []
        for message in messages:
            self._unconfirmed.pop(message.uuid, None)
            if message.uuid in echoed:
                confirmed.append(message)
                self._note(message.uuid, RECONFIRM_TRIES)  # the server has it: offered again, not told again
                continue
            # The app sends only echoed uuids; release the claim so a later offer can be taken again.
            self._release(message)
            log.warning("endpoint %s: task message %s not confirmed by ?task=sent; not sent", self._name, message.uuid)
        return confirmed

    def _release(self, message: TaskMessage) -> None:
        self._ledger.release_claim(self._key(message.uuid))
        metrics.TASK_MESSAGES.labels(self._name, "not_confirmed").inc()

    def _refused_before_work(self, exc: PollError, messages: list[TaskMessage]) -> PollError:
        """Release the first-time claims of a refused ``?task=sent``; the error that says what happened.

        Raises:
            LedgerError: a claim could not be released.
        """
        fresh = [m for m in messages if m.uuid not in self._unconfirmed]
        for message in fresh:
            self._release(message)
            metrics.TASK_RELEASED.labels(self._name, "sent_refused").inc()
        if fresh:
            # The operator's list of what to queue again at the server if it never offers them again.
            log.warning(
                "endpoint %s: ?task=sent refused (HTTP %s): task message(s) %s released unsent; the server may offer "
                "them again, or never if it marks messages sent when it hands them out: then queue them again there",
                self._name,
                exc.status,
                ", ".join(clip(m.uuid, 80) for m in fresh),
            )
        kept = len(messages) - len(fresh)
        parts: list[str] = []
        if fresh:
            parts.append(
                f"{len(fresh)} task message(s) released unsent (the server may offer them again, or never "
                "if it marks messages sent when it hands them out: smsgw_task_released_total)"
            )
        if kept:
            parts.append(f"{kept} claim(s) kept (an earlier ?task=sent for them may have been processed)")
        # One line (the poll loop's ERROR) that names both usual causes: some servers without the
        # Results API mark a message sent when they hand it out, so a released one is never offered again.
        return PollError(
            f"{exc}; {', '.join(parts)}. Likely causes: the secret or the credentials, or a server without "
            f"the Message Results API: then set {self._results_setting}",
            exc.outcome,
            exc.status,
        )

    def _kept_for_retry(self, exc: PollError | ReplyError, messages: list[TaskMessage]) -> PollError:
        """Keep the claims of a ``?task=sent`` without a usable answer for the next poll; the error to raise."""
        for message in messages:
            self._unconfirmed[message.uuid] = message
        what = f"unreadable ?task=sent reply: {exc}" if isinstance(exc, ReplyError) else str(exc)
        outcome = exc.outcome if isinstance(exc, PollError) else "bad_reply"
        status = exc.status if isinstance(exc, PollError) else None
        hint = (
            f" (a server without the Message Results API may answer ?task=sent so: then set {self._results_setting})"
            if status in (500, 501)
            else ""
        )
        return PollError(
            f"{what}; {len(messages)} claim(s) kept, ?task=sent retried on the next poll{hint}", outcome, status
        )
