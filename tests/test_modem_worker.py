"""modem_worker decisions that need no broker: what happens to outbound work while the modem is away."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modem_worker.worker import ModemWorker
from services.broker import Delivery, Retry
from services.ledger import Ledger
from services.schemas import OutboundSms
from services.settings import Settings


class _NoPublisher:
    def publish(self, *_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("nothing may be published for an SMS that was not sent")


def test_outbound_while_modem_down_waits_in_a_delay_queue_not_a_requeue_loop(tmp_path: Path) -> None:
    """A requeue would count towards the quorum queue's delivery limit and park the SMS unsent."""
    settings = Settings.from_env({"SMSGW_MODEM_PORT": str(tmp_path / "tty"), "SMSGW_STATE_DIR": str(tmp_path)})
    ledger = Ledger(tmp_path)
    worker = ModemWorker(settings, _NoPublisher(), ledger)  # type: ignore[arg-type]
    sms = OutboundSms("u-1", "+255700000001", "hello", "task", 0, report=True)
    decision = worker._handle_outbound(Delivery("smsgw.outbound", sms.to_json(), {}, False, "u-1"))
    assert isinstance(decision, Retry)
    assert ledger.get("u-1") is None, "the ledger must not claim an SMS that was never handed to a modem"
