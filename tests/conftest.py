"""Shared fixtures: a private RabbitMQ vhost per test session, free ports, deadline polling."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import pika
import pytest

from scripts.stack import free_port

T = TypeVar("T")
__all__ = ["free_port", "wait_for"]

BROKER_HOST = os.environ.get("SMSGW_TEST_BROKER_HOST", "127.0.0.1")
BROKER_PORT = int(os.environ.get("SMSGW_TEST_BROKER_PORT", "5672"))


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate!r}")
        time.sleep(interval)


def _broker_reachable() -> bool:
    try:
        with socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=2):
            return True
    except OSError:
        return False


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def require_broker() -> None:
    """In CI a missing broker is a failure, not a skip: the integration tests are the point of the suite."""
    if not _broker_reachable():
        message = f"RabbitMQ is not reachable at {BROKER_HOST}:{BROKER_PORT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to create the test vhost")


@contextmanager
def private_vhost() -> Iterator[str]:
    """Create a uniquely named vhost (guest has full rights), yield its name, delete it afterwards."""
    require_broker()
    vhost = f"smsgw-test-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def vhost_url(vhost: str) -> str:
    """AMQP URL of ``vhost`` on the test broker."""
    return f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{urllib.parse.quote(vhost, safe='')}"


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    """A private vhost shared by this test session's broker tests (removed afterwards)."""
    with private_vhost() as vhost:
        yield vhost


@pytest.fixture
def fresh_amqp_url() -> Iterator[str]:
    """A vhost of this test's own (multi-process tests: no leftovers from other tests can interfere)."""
    with private_vhost() as vhost:
        yield vhost_url(vhost)


@pytest.fixture(scope="session")
def amqp_url(amqp_vhost: str) -> str:
    """AMQP URL of the session's private vhost."""
    return vhost_url(amqp_vhost)


@pytest.fixture
def clean_broker(amqp_url: str) -> Iterator[str]:
    """The session vhost with every smsgw queue emptied before the test (tests share the vhost)."""
    _purge_all(amqp_url)
    yield amqp_url


def _purge_all(url: str) -> None:
    from services.broker import (
        DELAY_TIERS_S,
        EVENTS_QUEUE,
        INBOUND_QUEUE,
        OUTBOUND_QUEUE,
        declare_topology,
        delay_queue_for,
        parked_queue_for,
    )

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        declare_topology(channel)
        for work in (INBOUND_QUEUE, OUTBOUND_QUEUE, EVENTS_QUEUE):
            for name in (work, parked_queue_for(work), *(delay_queue_for(work, t) for t in DELAY_TIERS_S)):
                channel.queue_purge(name)
    finally:
        connection.close()
