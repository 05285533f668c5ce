"""Every ``SMSGW_*`` variable a worker reads is in its ``--help``, and its ``--help`` lists nothing it does not
read: both come from the worker's one declaration (``ENV``, a ``services.config.WorkerEnv``)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ("modem_worker", "sync_worker", "task_poller", "result_reporter", "send_api")
HELP_LINE = re.compile(r"^  (SMSGW_[A-Z_]+) ", re.MULTILINE)
SMSGW_LITERAL = re.compile(r"SMSGW_[A-Z_]+")

# Runs one worker's `--check` with os.environ replaced by a mapping that records every name looked up, then
# prints the SMSGW_* names read (the process is the worker's own: no logging or metrics leak into the tests).
RECORDING_RUN = """
import importlib, json, os, sys

class Recording(dict):
    def __init__(self, items):
        super().__init__(items)
        self.read = set()
    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)
    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)
    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

os.environ = environ = Recording(os.environ)
code = importlib.import_module(sys.argv[1] + ".__main__").main(["--check"])
print(json.dumps({"code": code, "read": sorted(n for n in environ.read if n.startswith("SMSGW_"))}))
"""


def help_names(worker: str, capsys: pytest.CaptureFixture[str]) -> set[str]:
    """The variables the worker's ``--help`` lists."""
    module = importlib.import_module(f"{worker}.__main__")
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0
    return set(HELP_LINE.findall(capsys.readouterr().out))


def names_read(worker: str, tmp_path: Path) -> tuple[int, set[str]]:
    """The exit code of ``python -m <worker> --check`` in an env-only deployment, and the variables it read."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SMSGW_")}
    env.update(
        SMSGW_AMQP_URL="amqp://guest:guest@127.0.0.1:1/%2F",  # nothing listens: the check ends unhealthy
        SMSGW_SYNC_URL="http://127.0.0.1:1/sync",
        SMSGW_MESSAGE_RESULTS="true",
        SMSGW_MODEM_PORT=str(tmp_path / "tty"),
        SMSGW_STATE_DIR=str(tmp_path / "state"),
        SMSGW_HEARTBEAT_DIR=str(tmp_path / "heartbeats"),
    )
    done = subprocess.run(
        [sys.executable, "-c", RECORDING_RUN, worker],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.strip(), done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["code"], set(result["read"])


@pytest.mark.parametrize("worker", WORKERS)
def test_a_worker_reads_exactly_the_variables_its_help_lists(
    worker: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = help_names(worker, capsys)
    code, read = names_read(worker, tmp_path)
    assert code == 1, "the check got past the configuration (unhealthy: no broker, no modem)"
    assert read - listed == set(), f"{worker} reads variables its --help does not list"
    assert listed - read == set(), f"{worker}'s --help lists variables it does not read"


@pytest.mark.parametrize("worker", WORKERS)
def test_every_variable_named_in_a_worker_package_is_in_its_help(
    worker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = help_names(worker, capsys)
    named = {
        (name, str(path.relative_to(ROOT)))
        for path in (ROOT / worker).rglob("*.py")
        for name in SMSGW_LITERAL.findall(path.read_text(encoding="utf-8"))
    }
    assert {(name, path) for name, path in named if name not in listed} == set()


@pytest.mark.parametrize("worker", WORKERS)
def test_a_worker_reading_the_ledger_url_reads_its_file_twin_too(
    worker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = help_names(worker, capsys)
    assert ("SMSGW_LEDGER_URL" in listed) == ("SMSGW_LEDGER_URL_FILE" in listed), sorted(listed)
    if worker in ("modem_worker", "task_poller"):  # the two that open the never-twice ledger
        assert "SMSGW_LEDGER_URL_FILE" in listed
