"""Logging: an outage is a line when it starts, then every few minutes; pika's own chatter stays out of the log."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from services.logs import OutageLog, configure_logging, quiet_libraries


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    pika_level = logging.getLogger("pika").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("pika").setLevel(pika_level)


def test_an_outage_is_one_line_then_one_every_few_minutes_and_one_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    logger = logging.getLogger("tests.outage")
    outage = OutageLog(logger, "RabbitMQ connection of w", repeat_s=300, clock=clock)
    with caplog.at_level(logging.INFO, logger="tests.outage"):
        for _ in range(20):  # back-off attempts within the first minutes
            outage.failed("cannot connect to RabbitMQ at h:5672 (vhost '/'): connection refused", retry_in_s=8)
            clock.now += 10
        clock.now += 200  # 400 s after the first line
        outage.failed("cannot connect to RabbitMQ at h:5672 (vhost '/'): connection refused")
        outage.failed("cannot connect to RabbitMQ at h:5672 (vhost '/'): connection refused")
        outage.recovered()
        outage.recovered()  # no outage any more: nothing to say
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.WARNING, logging.WARNING, logging.INFO]
    assert lines[0][1].startswith("RabbitMQ connection of w: cannot connect") and "next attempt in 8s" in lines[0][1]
    assert "still failing after 400s and 21 attempt(s)" in lines[1][1]
    assert "works again after 400s and 22 failed attempt(s)" in lines[2][1]
    assert not outage.ongoing


def test_a_new_reason_is_logged_at_once_and_the_next_outage_starts_afresh(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    outage = OutageLog(logging.getLogger("tests.outage"), "publisher", clock=clock)
    with caplog.at_level(logging.INFO, logger="tests.outage"):
        outage.failed("connection refused")
        outage.failed("connection refused")
        outage.failed("refused the login for user 'gw'", level=logging.ERROR)
        outage.recovered()
        outage.failed("connection refused")
    assert [(r.levelno, r.getMessage().split(": ", 1)[1][:20]) for r in caplog.records] == [
        (logging.WARNING, "connection refused ("),
        (logging.ERROR, "still failing after "),
        (logging.INFO, "works again after 0s"),
        (logging.WARNING, "connection refused ("),
    ]


def test_pika_connection_errors_stay_out_of_the_log(restore_logging: None) -> None:
    configure_logging("INFO", "test")
    stream = io.StringIO()
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    logging.getLogger("pika.adapters.utils.connection_workflow").error("AMQPConnector - reporting failure: ...")
    logging.getLogger("services.broker").warning("RabbitMQ connection of w: connection refused")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [("services.broker", "WARNING")]


def test_pika_speaks_again_at_debug(restore_logging: None) -> None:
    quiet_libraries("DEBUG")
    assert logging.getLogger("pika").getEffectiveLevel() == logging.WARNING
    quiet_libraries(logging.INFO)
    assert logging.getLogger("pika").getEffectiveLevel() == logging.CRITICAL
    assert logging.getLogger("urllib3").getEffectiveLevel() == logging.WARNING
