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
    """Run ``rabbitmqctl``; fail the test with its stderr when it fails or hangs (a hung broker must fail a test,
    not CI)."""
    try:
        done = subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=60, text=True, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rabbitmqctl {' '.join(args)} did not answer within 60 s (is RabbitMQ hung?)")
    if done.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")


def require_broker() -> None:
    """In CI a missing broker is a failure, not a skip: the integration tests are the point of the suite."""
    if not _broker_reachable():
        message = f"RabbitMQ is not reachable at {BROKER_HOST}:{BROKER_PORT}"
        # scripts/test starts RabbitMQ itself, so there a missing broker is a failure too (a skip would hide it).
        if os.environ.get("CI") or os.environ.get("SMSGW_TEST_REQUIRE_SERVICES"):
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
    from services.topology import (
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
            for name in (work, parked_queue_for(work)):
                channel.queue_purge(name)
        for tier in DELAY_TIERS_S:  # shared by every work queue
            channel.queue_purge(delay_queue_for(tier))
    finally:
        connection.close()


# --- PostgreSQL: the fleet backend of the never-twice ledger (services/ledger/postgres.py) ----------------------
PG_TEST_URL = os.environ.get("SMSGW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def require_postgres() -> None:
    """PostgreSQL answers at PG_TEST_URL; else the test fails (CI, scripts/test: they start it) or is skipped."""
    import psycopg

    try:
        with psycopg.connect(PG_TEST_URL, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        message = f"PostgreSQL is not reachable at {PG_TEST_URL}: {' '.join(str(exc).split())}"
        if os.environ.get("CI") or os.environ.get("SMSGW_TEST_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def private_schema() -> Iterator[str]:
    """Create a uniquely named schema in the test database, yield its name, drop it (and its tables) afterwards."""
    import psycopg

    require_postgres()
    schema = f"smsgw_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_TEST_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield schema
    finally:
        with psycopg.connect(PG_TEST_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SET lock_timeout = '30s'")  # a connection left in a transaction fails the drop, not CI
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def pg_schema_url(schema: str) -> str:
    """SMSGW_LEDGER_URL of ``schema`` in the test database (libpq's options set the search_path)."""
    return f"{PG_TEST_URL}{'&' if '?' in PG_TEST_URL else '?'}options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """SMSGW_LEDGER_URL of a PostgreSQL schema of this test session (dropped afterwards); tests sharing it must
    use keys of their own."""
    with private_schema() as schema:
        yield pg_schema_url(schema)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """SMSGW_LEDGER_URL of an empty PostgreSQL schema of this test's own."""
    with private_schema() as schema:
        yield pg_schema_url(schema)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SMSGW_LEDGER_URL of an empty ledger, once per backend: a test taking it runs against SQLite and PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path_factory.mktemp('ledger')}/outbound-ledger.sqlite3"
        return
    with private_schema() as schema:
        yield pg_schema_url(schema)
