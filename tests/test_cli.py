"""The ``smsgw`` command against the real RabbitMQ: parked list/replay/purge (per endpoint), config check, help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from services.broker import (
    HEADER_PARK_REASON,
    HEADER_PARKED_AT_MS,
    HEADER_SOURCE_QUEUE,
)
from services.cli import parked_main, plugin_commands, vhost_of, workers
from services.topology import (
    EVENTS_QUEUE,
    INBOUND_QUEUE,
    PARKED_EXCHANGE,
    Topology,
    declare_topology,
    events_queue_for,
    inbound_queue_for,
    parked_queue_for,
)

SMSGW = Path(sys.executable).parent / "smsgw"


@contextmanager
def channel(url: str, topology: Topology | None = None) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = connection.channel()
        declare_topology(ch, topology)
        yield ch
    finally:
        connection.close()


def park(url: str, work_queue: str, topology: Topology | None = None, message_id: str = "m-1") -> None:
    """Put one message into ``work_queue``'s parked queue, as the consumer's park does (confirmed)."""
    with channel(url, topology) as ch:
        ch.confirm_delivery()
        ch.basic_publish(
            PARKED_EXCHANGE,
            work_queue,
            json.dumps({"schema": "inbound_sms/1", "text": "Habari"}).encode(),
            pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=message_id,
                headers={
                    HEADER_PARK_REASON: "refused 10 times",
                    HEADER_PARKED_AT_MS: int(time.time() * 1000),
                    HEADER_SOURCE_QUEUE: work_queue,
                },
            ),
            mandatory=True,
        )


def depth(url: str, queue: str) -> int:
    with channel(url) as ch:
        return int(ch.queue_declare(queue, passive=True).method.message_count)


def run_parked(argv: list[str]) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = parked_main(argv, out=lines.append, note=lines.append)
    return code, lines


@pytest.fixture
def env_only(clean_broker: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session vhost, with only today's variables (no fleet file): one endpoint named "default"."""
    monkeypatch.setenv("SMSGW_AMQP_URL", clean_broker)
    monkeypatch.delenv("SMSGW_CONFIG", raising=False)
    return clean_broker


def test_vhost_of_reads_the_url_path() -> None:
    assert vhost_of("amqp://u:p@h:5672/%2F") == "/"
    assert vhost_of("amqp://u:p@h:5672") == "/"
    assert vhost_of("amqp://u:p@h:5672/smsgw-test-1,amqp://u:p@h2:5672/smsgw-test-1") == "smsgw-test-1"


def test_parked_list_ends_with_a_count_line_also_at_zero(env_only: str) -> None:
    vhost = vhost_of(env_only)
    code, lines = run_parked(["list"])
    assert code == 0
    assert lines == [f"0 parked message(s) in {INBOUND_QUEUE}.parked (vhost {vhost})"]

    park(env_only, INBOUND_QUEUE)
    code, lines = run_parked(["list", "--queue", "inbound"])
    assert code == 0
    assert lines[-1] == f"1 parked message(s) in {INBOUND_QUEUE}.parked (vhost {vhost})"
    row = json.loads(lines[0])
    assert row["message_id"] == "m-1" and row["reason"] == "refused 10 times" and row["queue"] == INBOUND_QUEUE
    assert "body" not in row, "SMS text only with --show-body"
    code, lines = run_parked(["list", "--show-body"])
    assert "Habari" in json.loads(lines[0])["body"]
    assert depth(env_only, parked_queue_for(INBOUND_QUEUE)) == 1, "listing must leave the message parked"


def test_parked_replay_moves_the_message_back_to_its_work_queue(env_only: str) -> None:
    park(env_only, EVENTS_QUEUE)
    code, lines = run_parked(["replay", "--queue", "events"])
    assert code == 0
    assert lines == [
        f"replayed 1 message(s) from {EVENTS_QUEUE}.parked (vhost {vhost_of(env_only)}) into {EVENTS_QUEUE}"
    ]
    assert depth(env_only, EVENTS_QUEUE) == 1
    assert depth(env_only, parked_queue_for(EVENTS_QUEUE)) == 0


def test_parked_purge_needs_yes(env_only: str, capsys: pytest.CaptureFixture[str]) -> None:
    park(env_only, INBOUND_QUEUE)
    code, lines = run_parked(["purge"])
    assert code == 2 and lines == []
    assert "--yes" in capsys.readouterr().err
    assert depth(env_only, parked_queue_for(INBOUND_QUEUE)) == 1, "nothing deleted without --yes"
    code, lines = run_parked(["purge", "--yes"])
    assert code == 0 and lines[0].startswith("purged 1 message(s)")
    assert depth(env_only, parked_queue_for(INBOUND_QUEUE)) == 0


def test_parked_rejects_an_unknown_queue_or_endpoint(env_only: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_parked(["list", "--queue", "nonsense"])[0] == 2
    assert run_parked(["list", "--endpoint", "clinic"])[0] == 2
    assert "unknown endpoint 'clinic'" in capsys.readouterr().err
    code, lines = run_parked(["list", "--queue", "smsgw.outbound.no-such-modem"])
    assert code == 1 and lines == []
    assert "no queue smsgw.outbound.no-such-modem.parked" in capsys.readouterr().err


def _fleet_file(tmp_path: Path, names: list[str]) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(
        "".join(f'[[endpoints]]\nname = "{name}"\nsync_url = "http://127.0.0.1:9/{name}"\n\n' for name in names),
        encoding="utf-8",
    )
    return path


def test_parked_endpoint_picks_that_endpoints_queue(
    clean_broker: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suffix = uuid.uuid4().hex[:8]  # queues of their own in the shared session vhost
    clinic, helpline = f"clinic-{suffix}", f"helpline-{suffix}"
    monkeypatch.setenv("SMSGW_AMQP_URL", clean_broker)
    monkeypatch.setenv("SMSGW_CONFIG", str(_fleet_file(tmp_path, [clinic, helpline])))
    topology = Topology(inbound_endpoints=(clinic, helpline), event_endpoints=(clinic, helpline))
    park(clean_broker, inbound_queue_for(clinic), topology)

    code, lines = run_parked(["list", "--endpoint", clinic])
    assert code == 0 and len(lines) == 2
    assert lines[-1].startswith(f"1 parked message(s) in smsgw.inbound.{clinic}.parked")
    code, lines = run_parked(["list", "--endpoint", helpline])
    assert code == 0 and lines == [
        f"0 parked message(s) in smsgw.inbound.{helpline}.parked (vhost {vhost_of(clean_broker)})"
    ]
    code, lines = run_parked(["list", "--queue", "events", "--endpoint", helpline])
    assert code == 0 and lines[-1].startswith(f"0 parked message(s) in {events_queue_for(helpline)}.parked")

    capsys.readouterr()
    assert run_parked(["list"])[0] == 2, "two endpoints, none named"
    assert "--endpoint" in capsys.readouterr().err
    code, lines = run_parked(["replay", "--endpoint", clinic])
    assert code == 0 and lines[0].startswith("replayed 1 message(s)")
    assert depth(clean_broker, inbound_queue_for(clinic)) == 1
    assert depth(clean_broker, inbound_queue_for(helpline)) == 0


def test_parked_with_the_only_endpoint_of_a_fleet_file_needs_no_endpoint(
    clean_broker: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    only = f"only-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("SMSGW_AMQP_URL", clean_broker)
    monkeypatch.setenv("SMSGW_CONFIG", str(_fleet_file(tmp_path, [only])))
    code, lines = run_parked(["list"])
    assert code == 0 and lines[-1].startswith(f"0 parked message(s) in smsgw.inbound.{only}.parked")


# --- the installed script ----------------------------------------------------------------------------------------


def smsgw(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert SMSGW.exists(), f"{SMSGW} missing: pip install -e . (pyproject [project.scripts])"
    return subprocess.run(
        [str(SMSGW), *args], check=False, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def test_smsgw_help_lists_the_subcommands() -> None:
    done = smsgw("--help")
    assert done.returncode == 0, done.stderr
    for command in (
        "parked",
        "config",
        "check",
        "modem-worker",
        "sync-worker",
        "task-poller",
        "result-reporter",
        "send-api",
    ):
        assert command in done.stdout
    assert "compose-modems" in done.stdout and "one modem worker per device" in " ".join(done.stdout.split())
    assert smsgw("no-such-command").returncode == 2


def test_the_workers_and_their_commands_come_from_entry_points() -> None:
    # services/cli.py names no worker: what it runs is what the installed packages declare (pyproject.toml).
    installed = workers()
    assert sorted(installed) == ["modem-worker", "result-reporter", "send-api", "sync-worker", "task-poller"]
    assert {name: point.value for name, point in installed.items()}["task-poller"] == "task_poller.__main__:main"
    assert plugin_commands()["compose-modems"].value == "modem_worker.compose_modems:main"
    for point in (*installed.values(), *plugin_commands().values()):
        assert callable(point.load()), point


def test_smsgw_check_knows_the_installed_workers_only() -> None:
    done = smsgw("check", "no-such-worker")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr and "task-poller" in done.stderr


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``smsgw ARGS`` as ``python -m services.cli`` from this checkout (the venv's ``smsgw`` may be another's)."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )


def test_smsgw_accepts_the_package_spelling_of_a_worker() -> None:
    done = cli("sync_worker", "--help")
    assert done.returncode == 0, done.stderr
    assert "--check" in done.stdout
    check = cli("check", "sync_worker")
    assert "invalid choice" not in check.stderr
    assert check.returncode == cli("check", "sync-worker").returncode


def test_the_config_check_usage_line_names_the_smsgw_command() -> None:
    done = cli("config", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: smsgw config ")
    assert "python -m" not in done.stdout


def test_smsgw_runs_a_worker_as_python_m_does() -> None:
    done = smsgw("task-poller", "--help")
    assert done.returncode == 0, done.stderr
    assert "--check" in done.stdout and "SMSGW_TASK_INTERVAL" in done.stdout


def test_smsgw_parked_list_as_a_command(env_only: str) -> None:
    done = smsgw("parked", "list", env={"SMSGW_AMQP_URL": env_only})
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # stdout holds only JSON rows; the count line is on stderr
    assert done.stderr.splitlines()[-1] == f"0 parked message(s) in {INBOUND_QUEUE}.parked (vhost {vhost_of(env_only)})"


def test_smsgw_config_check_good_and_bad_file(tmp_path: Path) -> None:
    good = _fleet_file(tmp_path, ["clinic", "helpline"])
    done = smsgw("config", "check", str(good))
    assert done.returncode == 0, done.stderr
    assert "2 endpoint(s)" in done.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[endpoints]]\nname = "clinic"\nsync_url = "http://127.0.0.1:9/"\n\n'
        '[[endpoints]]\nname = "helpline"\nsync_url = "http://127.0.0.1:9/"\npatterns = ["(unclosed"]\n',
        encoding="utf-8",
    )
    done = smsgw("config", "check", str(bad))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(bad) in lines[0] and "endpoints[1].patterns[0]" in lines[0]
    assert done.stdout == ""
