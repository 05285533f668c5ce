"""Receiving: SMS and status reports announced by URCs or found by a sweep of the SIM, handed to the callbacks
and deleted from the SIM only after they returned (the delivery contract in :mod:`modem_worker.modem`)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .at_fixes import CommandError, LinkDown, TimeoutException
from .channel import AtChannel
from .errors import ModemError, ModemUnavailable
from .messages import ReceivedMessage, StatusReport, UnreadableMessage
from .pending import PendingDeletes
from .reassembly import CallbackFailed, Location, Reassembly
from .stored_pdu import StatusReportPdu, decode_stored_pdu

logger = logging.getLogger(__name__)

_UNREADABLE_LOGGED_MAX: Final[int] = 2000


@dataclass(frozen=True)
class _StoredEvent:
    memory: str
    index: int


@dataclass(frozen=True)
class _DirectEvent:
    pdu: str


@dataclass(frozen=True)
class _Tick:
    """No event within the tick interval: only check multipart time-outs."""


_TICK: Final[_Tick] = _Tick()
_Event = _StoredEvent | _DirectEvent | _Tick  # None in the queue stops the worker


def status_delivered(status: int) -> bool | None:
    """Map TP-Status (23.040 9.2.3.15) to delivered True / pending None / failed False."""
    if status < 0x20:
        return True
    if status < 0x40:
        return None
    return False


class Receiver:
    """Hands received SMS and reports to the callbacks: a worker thread per connection for the URCs, and
    :meth:`sweep` for what is stored. Both hold the delivery lock across read -> callback -> delete."""

    def __init__(
        self,
        channel: AtChannel,
        *,
        on_message: Callable[[ReceivedMessage], None],
        on_status_report: Callable[[StatusReport], None],
        on_unreadable: Callable[[UnreadableMessage], None] | None,
        multipart_timeout_s: float,
        pending_deletes: PendingDeletes | None = None,
    ) -> None:
        """Nothing runs until :meth:`start`. ``pending_deletes``: the delivered copies whose delete failed, shared
        by every adapter of the process (default: this receiver's own, forgotten with it)."""
        self._channel = channel
        self._on_message = on_message
        self._on_status_report = on_status_report
        self._on_unreadable = on_unreadable
        self._multipart_timeout_s = multipart_timeout_s
        self._worker: threading.Thread | None = None
        self._events: queue.Queue[_Event | None] = queue.Queue()
        self._stopping = threading.Event()
        # Held across read -> on_message -> delete, by the worker and by sweep(), so one stored SMS is never
        # handled by both at once (which would deliver it twice).
        self._delivery_lock = threading.RLock()
        self._reassembly = Reassembly(multipart_timeout_s, self._deliver, self._delete)
        # +CMT PDUs whose delivery failed. Nothing is on the SIM to fall back on, so they wait here for the
        # next sweep (lost only if the process dies first; we configure the modem to store SMS, +CMT comes
        # only from modems that ignore that).
        self._direct_retry: list[str] = []
        # Outlives this receiver when the worker passes its own: the connection that saw the delete fail is gone
        # by the time the sweep after the reconnect finds the copy again.
        self._pending_deletes = pending_deletes if pending_deletes is not None else PendingDeletes()
        # Undecodable entries already logged (insertion-ordered, bounded): logged once, not on every sweep.
        self._unreadable_logged: dict[Location, None] = {}
        # Successful on_message/on_status_report calls and SIM deletions so far (sweep() reports deltas).
        self._delivered_count = 0
        self._deleted_count = 0

    # ------------------------------------------------------------------ the worker of one connection

    def prepare(self) -> None:
        """Fresh event queue and stop flag for a new connection, before its port opens (a +CMTI during the init
        dialogue must not be lost, and a worker of a dead connection must never take events of the next one)."""
        self._stopping = threading.Event()
        self._events = queue.Queue()

    def start(self, port: str) -> None:
        """Forget the parts buffered for the previous connection and start this connection's worker thread."""
        with self._delivery_lock:
            # Buffers refer to SIM slots of the previous session; the next sweep rebuilds them.
            self._reassembly.clear()
        self._worker = threading.Thread(
            target=self._work, args=(self._events, self._stopping), name=f"modem-worker {port}", daemon=True
        )
        self._worker.start()

    def stop(self) -> None:
        """Stop the worker after the item in hand (e.g. the delete after a confirmed delivery): otherwise that SMS
        would stay on the SIM and be delivered again after a restart. Idempotent."""
        self._stopping.set()
        self._events.put(None)
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=10)
        self._worker = None

    def wake_to_stop(self) -> None:
        """Make the worker end once it looks at its queue again (the link died: it must not block a close)."""
        self._events.put(None)

    def stored(self, memory: str, index: int) -> None:
        """A +CMTI/+CDSI announced ``memory``/``index`` (read thread: only queued here)."""
        self._events.put(_StoredEvent(memory, index))

    def direct(self, pdu: str) -> None:
        """A +CMT/+CDS delivered ``pdu`` directly (read thread: only queued here)."""
        self._events.put(_DirectEvent(pdu))

    # ------------------------------------------------------------------ handling (delivery lock held)

    def _work(self, events: queue.Queue[_Event], stopping: threading.Event) -> None:
        """Worker thread: handle queued notifications one at a time, flush expired multipart buffers.

        ``events``/``stopping`` belong to one connection, so a worker of a dead connection can never take
        events of the next one.
        """
        tick = max(0.05, min(1.0, self._multipart_timeout_s / 4))
        while not stopping.is_set():
            try:
                event: _Event | None = events.get(timeout=tick)
            except queue.Empty:
                event = _TICK
            if event is None or stopping.is_set():
                return
            try:
                with self._delivery_lock:
                    if isinstance(event, _StoredEvent):
                        self._handle_stored_event(event)
                    elif isinstance(event, _DirectEvent):
                        self._process_direct(event.pdu)
                    self._reassembly.flush_expired(include_failed=False)
            except CallbackFailed as exc:
                logger.warning("%s; kept on the SIM for the next sweep", exc)
            except (LinkDown, ModemUnavailable) as exc:
                logger.warning("modem link lost while handling a notification: %s", exc)
            except (TimeoutException, CommandError) as exc:
                # Left on the SIM: the next sweep_stored() picks it up.
                logger.warning("reading a notified SMS failed (%r); left for the next sweep", exc)
            except Exception:
                logger.exception("unexpected error handling a modem notification")

    def _process_direct(self, pdu: str) -> None:
        """Handle a +CMT PDU; keeps it for the next sweep when delivery fails. Raises CallbackFailed then."""
        try:
            self._process(None, pdu)
        except CallbackFailed:
            self._direct_retry.append(pdu)
            raise

    def _handle_stored_event(self, event: _StoredEvent) -> None:
        """Read the slot a +CMTI/+CDSI announced and process it. Raises LinkDown, TimeoutException,
        CommandError, ModemUnavailable (the SMS then stays on the SIM for the sweep)."""
        gsm = self._channel.require()
        pdu = gsm.read_stored_pdu(event.memory, event.index)
        if pdu is None:
            logger.debug("slot %s/%d already empty (handled by a sweep)", event.memory, event.index)
            return
        self._process((event.memory, event.index, pdu), pdu)

    def sweep(self, memories: tuple[str, ...]) -> int:
        """List every stored message (AT+CMGL=4 on SM and SR memory) and deliver what is deliverable:
        single SMS, completed or expired multipart SMS (incl. ones whose delivery failed before), status
        reports, undecodable entries (to ``on_unreadable``). Returns how many ``on_message``/
        ``on_status_report`` calls succeeded.

        Stops at the first ``on_message``/``on_status_report`` that raises (logged, not re-raised): the
        broker is most likely down, and trying every other stored SMS would hold the delivery lock for one
        publish timeout each. What is left stays on the SIM for the next sweep.

        Raises ModemUnavailable (link lost / no answer), ModemError (listing refused).
        """
        with self._delivery_lock:
            gsm = self._channel.require()
            entries: list[Location] = []
            for memory in memories:
                try:
                    entries += [(memory, index, pdu) for index, pdu in gsm.list_stored_pdus(memory)]
                except (LinkDown, TimeoutException) as exc:
                    raise ModemUnavailable(f"listing {memory} failed: {exc!r}") from exc
                except CommandError as exc:
                    raise ModemError(f"listing {memory} failed: {exc}") from exc
            delivered_before, deleted_before = self._delivered_count, self._deleted_count
            try:
                while self._direct_retry:
                    self._process(None, self._direct_retry[0])
                    self._direct_retry.pop(0)
                for location in entries:
                    self._process(location, location[2])
                self._reassembly.retry_failed()
                self._reassembly.flush_expired(include_failed=True)
            except CallbackFailed as exc:
                left = max(0, len(entries) - (self._deleted_count - deleted_before))
                logger.warning("stopping the sweep: %s; %d SMS stay on the SIM for the next sweep", exc, left)
            return self._delivered_count - delivered_before

    def _process(self, location: Location | None, pdu: str) -> None:
        """Handle one stored (or directly delivered) PDU.

        Raises CallbackFailed when on_message/on_status_report raised (the SMS stays on the SIM)."""
        if location is not None and self._pending_deletes.holds(location):
            # Delivered before, only the delete failed: finish the delete, never deliver twice.
            logger.info(
                "SIM %s/%d was delivered before (only its delete failed): deleting it, not delivering it again",
                location[0],
                location[1],
            )
            self._delete([location])
            return
        try:
            decoded = decode_stored_pdu(pdu)
        except ValueError as exc:
            self._unreadable(location, pdu, str(exc))
            return
        if isinstance(decoded, StatusReportPdu):
            self._deliver_report(location, decoded)
            return
        if decoded.concat is not None and decoded.concat[1] > 1 and not 1 <= decoded.concat[2] <= decoded.concat[1]:
            reference, total, seq = decoded.concat
            # Buffered under an impossible number it would count towards "all parts there" while a real
            # part is missing, and the message would come out complete=True with text lost.
            logger.warning(
                "concatenated part with sequence %d of %d (ref %d) from %s cannot be placed: delivered on its own",
                seq,
                total,
                reference,
                decoded.sender,
            )
        elif decoded.concat is not None and decoded.concat[1] > 1:
            self._reassembly.add_part(location, decoded)
            return
        message = ReceivedMessage(
            sender=decoded.sender,
            text=decoded.text,
            smsc_time=decoded.smsc_time,
            sim_indices=(location[1],) if location else (),
            parts=1,
            complete=True,
        )
        self._deliver(message, [location] if location else [])

    def _unreadable(self, location: Location | None, pdu: str, reason: str) -> None:
        """An undecodable PDU: hand it to on_unreadable and delete it after that returned; otherwise keep it
        on the SIM and log it once per (memory, index, pdu)."""
        # A direct +CMT has no SIM slot: it is handed over as memory "+CMT", index -1.
        memory, index = (location[0], location[1]) if location is not None else ("+CMT", -1)
        failure = "no on_unreadable callback"
        if self._on_unreadable is not None:
            try:
                self._on_unreadable(UnreadableMessage(memory=memory, index=index, pdu_hex=pdu, reason=reason))
            except Exception as exc:
                failure = f"on_unreadable failed ({exc!r})"
            else:
                logger.warning("undecodable PDU at %s/%d handed over and deleted: %s", memory, index, reason)
                if location is not None:
                    self._delete([location])
                return
        if location is None:
            # Not on the SIM, so it cannot wait there; logged in full so an operator still has the PDU.
            logger.error("undecodable PDU in a +CMT could not be handed over (%s): %s; pdu=%s", failure, reason, pdu)
            return
        if location in self._unreadable_logged:
            logger.debug("undecodable PDU at %s/%d still on the SIM (%s)", memory, index, failure)
            return
        self._unreadable_logged[location] = None
        if len(self._unreadable_logged) > _UNREADABLE_LOGGED_MAX:
            del self._unreadable_logged[next(iter(self._unreadable_logged))]
        logger.error(
            "undecodable PDU at %s/%d left on the SIM (%s; logged once): %s; pdu=%s",
            memory,
            index,
            failure,
            reason,
            pdu,
        )

    def _deliver(self, message: ReceivedMessage, locations: list[Location]) -> None:
        """Call on_message; only after it returned, delete the SIM copies. Raises CallbackFailed when
        on_message raised."""
        try:
            self._on_message(message)
        except Exception as exc:
            # Not confirmed by the broker: the SIM copy is the only copy, keep it for the next sweep.
            raise CallbackFailed(f"on_message failed ({exc!r}) for the SMS at SIM {message.sim_indices}") from exc
        self._delivered_count += 1
        logger.debug("delivered SMS from %s: %r", message.sender, message.text)
        self._delete(locations)

    def _deliver_report(self, location: Location | None, sr: StatusReportPdu) -> None:
        """Call on_status_report; delete the SR copy only after it returned. Raises CallbackFailed when
        on_status_report raised."""
        report = StatusReport(
            reference=sr.reference,
            recipient=sr.recipient,
            delivered=status_delivered(sr.status),
            status=sr.status,
            finalized_at=sr.finalized_at,
        )
        try:
            self._on_status_report(report)
        except Exception as exc:
            raise CallbackFailed(f"on_status_report failed ({exc!r}) for report {sr.reference}") from exc
        self._delivered_count += 1
        self._delete([location] if location else [])

    def _delete(self, locations: list[Location]) -> None:
        """Delete delivered copies from the SIM. A failed delete is remembered (``pending_deletes``) so that
        the copy, when seen again, is deleted without being delivered a second time."""
        gsm = self._channel.gsm
        for location in locations:
            memory, index = location[0], location[1]
            self._pending_deletes.add(location)
            if gsm is None:
                continue
            try:
                gsm.delete_stored(memory, index)
            except (LinkDown, TimeoutException, CommandError) as exc:
                logger.warning(
                    "deleting %s/%d failed (%r); it stays on the SIM, and the next sweep of this process deletes it "
                    "without delivering it again (after a restart it is delivered again, same message_id)",
                    memory,
                    index,
                    exc,
                )
                continue
            self._pending_deletes.discard(location)
            self._unreadable_logged.pop(location, None)
            self._deleted_count += 1
