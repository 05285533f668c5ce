"""``smsgw compose-modems``: the override it writes is a valid compose file that runs one modem worker per device."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from modem_worker.compose_modems import UsageError, parse_modems, render
from services import cli
from tests.test_deploy_files import (
    ROOT,
    _compose,
    _environment,
    _merge,
    _resolve_extends,
    _schema_validator,
    config_mounts,
)

DEVICES = [
    "/dev/serial/by-id/usb-Quectel_EC25_0123456-if02-port0",
    "/dev/serial/by-id/usb-Quectel_EC25_0123457-if02-port0=helpline",
    "/dev/smsgw-modem3",
]


def _generate(argv: list[str]) -> dict[str, Any]:
    from modem_worker import compose_modems

    lines: list[str] = []
    assert compose_modems.main(argv, out=lines.append) == 0
    data: dict[str, Any] = yaml.safe_load("\n".join(lines))
    return data


def test_the_written_override_validates_and_runs_one_worker_per_device() -> None:
    override = _generate(DEVICES)
    validator = _schema_validator()
    assert not list(validator.iter_errors(override))
    project = _merge(_compose(), override)
    project["services"] = _resolve_extends(project["services"], ROOT)
    assert not [e.message for e in validator.iter_errors(project)]
    modems = {name: project["services"][name] for name in override["services"]}
    # Named as the docs name them, in argument order; the id is what names the queue.
    assert list(modems) == ["modem_worker_1", "modem_worker_2", "modem_worker_3"]
    assert [_environment(s)["SMSGW_MODEM_ID"] for s in modems.values()] == ["modem1", "helpline", "modem3"]
    assert [_environment(s)["SMSGW_MODEM_PORT"] for s in modems.values()] == [
        "/dev/host/serial/by-id/usb-Quectel_EC25_0123456-if02-port0",
        "/dev/host/serial/by-id/usb-Quectel_EC25_0123457-if02-port0",
        "/dev/host/smsgw-modem3",
    ]
    for name, service in modems.items():
        assert service["command"] == ["python", "-m", "modem_worker"], name
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
        # Issue 14: no devices: entry (an unplugged modem stopped `up`), and the fleet file with SMSGW_CONFIG.
        assert "devices" not in service, name
        assert "/dev:/dev/host:ro" in service["volumes"], name
        assert "SMSGW_CONFIG" in _environment(service) and config_mounts(service) == [ROOT / "config"], name
        assert service["secrets"] == ["rabbitmq_password"], name


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["/dev/a=m1", "/dev/b=m1"], "given twice"),
        (["/dev/a", "/dev/a"], "given twice"),
        (["ttyUSB0"], "absolute path"),
        (["/home/me/modem"], "under /dev/"),
        (["/dev/serial/by-path/pci-0000:00:14.0-usb-0:1:1.0-port0"], "without ':'"),
        (["/dev/a=bad id"], "SMSGW_MODEM_ID"),
    ],
)
def test_bad_devices_and_ids_are_refused_with_one_line(
    arguments: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UsageError, match=complaint):
        parse_modems(arguments)
    assert cli.main(["compose-modems", *arguments]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and complaint in captured.err


def test_unstable_device_names_are_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["compose-modems", "/dev/ttyUSB0"]) == 0
    captured = capsys.readouterr()
    assert "warning: /dev/ttyUSB0" in captured.err
    service = yaml.safe_load(captured.out)["services"]["modem_worker_1"]
    assert service["environment"]["SMSGW_MODEM_PORT"] == "/dev/host/ttyUSB0"


def test_render_quotes_values_yaml_reads_back() -> None:
    text = render(parse_modems(["/dev/modem-#1=a.b_c-1"]))
    service = yaml.safe_load(text)["services"]["modem_worker_1"]
    assert service["environment"] == {"SMSGW_MODEM_ID": "a.b_c-1", "SMSGW_MODEM_PORT": "/dev/host/modem-#1"}
