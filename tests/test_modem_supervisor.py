"""modem_worker.supervisor (watchdog, reboot detection, escalation, identity, a locked SIM) with fake modems, and
modem_worker.sim_pin (the SIM's three tries)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modem_worker import metrics
from modem_worker import supervisor as supervisor_module
from modem_worker.modem import ModemError, ModemIdentity, ModemInfo, ModemUnavailable, SimLocked
from modem_worker.sim_pin import SimPin, configured_pin
from modem_worker.supervisor import ModemSupervisor, Outcome, SupervisorPolicy, candidate_ports
from services.config import ConfigError, Settings
from tests.conftest import wait_for

INFO = ModemInfo(own_number=None, imsi="640021234567890", manufacturer="SIM", model="X")
IDENTITY = ModemIdentity(imei="356938035643809", iccid="8925502000000000001", imsi="640021234567890")


class FakeModem:
    """Scripted stand-in for the adapter: what connect() does, how probes and settings checks answer."""

    def __init__(
        self,
        *,
        connect_error: BaseException | None = None,
        probes: list[bool] | None = None,
        settings: list[bool | BaseException] | None = None,
        identity: ModemIdentity = IDENTITY,
    ) -> None:
        self.connect_error = connect_error
        self.probes = probes or []  # answers in order; then True
        self.settings = settings or []  # answers in order; then True
        self.identity = identity
        self.alive = False
        self.closed = False
        self.probed = 0
        self.checked = 0

    def connect(self) -> ModemInfo:
        if self.connect_error is not None:
            raise self.connect_error
        self.alive = True
        return INFO

    def read_identity(self) -> ModemIdentity:
        return self.identity

    def probe(self, deadline_s: float) -> bool:
        self.probed += 1
        return self.probes.pop(0) if self.probes else True

    def settings_hold(self) -> bool:
        self.checked += 1
        answer = self.settings.pop(0) if self.settings else True
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self) -> None:
        self.closed = True
        self.alive = False


class FakeHost:
    """The worker side: hands out the scripted modems in order, records what the supervisor did."""

    def __init__(self, modems: list[FakeModem]) -> None:
        self.modems = modems
        self.opened: list[tuple[str, FakeModem]] = []
        self.up: list[FakeModem] = []
        self.swept: list[FakeModem] = []
        self.downs = 0

    def open_modem(self, port: str) -> FakeModem:
        modem = self.modems.pop(0) if self.modems else FakeModem(connect_error=ModemUnavailable("gone"))
        self.opened.append((port, modem))
        return modem

    def modem_up(self, modem: FakeModem, info: ModemInfo) -> None:
        self.up.append(modem)

    def keep_serving(self) -> bool:
        return True

    def housekeeping(self, modem: FakeModem) -> None:
        self.swept.append(modem)

    def modem_down(self) -> None:
        self.downs += 1


class Running:
    """A supervisor on its own thread, with the worker's three events."""

    def __init__(self, host: FakeHost, modem_id: str, policy: SupervisorPolicy | None = None, **kwargs: Any) -> None:
        self.stopping, self.down, self.wake = threading.Event(), threading.Event(), threading.Event()
        self.supervisor = ModemSupervisor(
            modem_id,
            kwargs.pop("port", "/dev/fake"),
            host,  # type: ignore[arg-type]
            policy or SupervisorPolicy(watchdog_s=0.05, reconnect_first_s=0.01, reconnect_max_s=0.02),
            stopping=self.stopping,
            down=self.down,
            wake=self.wake,
            **kwargs,
        )
        self.outcome: Outcome | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.outcome = self.supervisor.run()

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def _value(metric: Any, *labels: str) -> float:
    """The value of ``metric``'s series with ``labels`` (0 when it has none yet), read through ``collect()``."""
    for family in metric.collect():
        for sample in family.samples:
            if tuple(sample.labels.values()) == labels and not sample.name.endswith("_created"):
                return float(sample.value)
    return 0.0


def _lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == supervisor_module.log.name]


_ids = iter(range(1_000_000))


@pytest.fixture
def modem_id() -> str:
    return f"sup-{next(_ids)}-{time.monotonic_ns() % 100000}"


def test_no_answer_to_the_probe_reopens_the_port_and_sweeps_once_per_episode(
    modem_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    hung, fresh = FakeModem(probes=[False]), FakeModem()
    host = FakeHost([hung, FakeModem(connect_error=ModemUnavailable("still hung")), fresh])
    with Running(host, modem_id):
        wait_for(lambda: fresh in host.swept, timeout=10, what="the reopened modem swept")
    assert hung.closed, "the hung connection must be closed (that is what ends the hang)"
    assert host.up == [hung, fresh]
    assert _value(metrics.MODEM_WATCHDOG_RESETS, modem_id, "reopen") == 1
    warnings = [m for m in _lines(caplog, logging.WARNING) if modem_id in m]
    infos = [m for m in _lines(caplog, logging.INFO) if modem_id in m and "back after" in m]
    assert len(warnings) == 1 and "did not answer AT" in warnings[0], warnings
    assert len(infos) == 1, infos


def test_a_failed_command_is_followed_by_a_probe_and_nothing_else_when_it_answers(modem_id: str) -> None:
    modem = FakeModem()
    host = FakeHost([modem])
    policy = SupervisorPolicy(watchdog_s=3600, reconnect_first_s=0.01)
    with Running(host, modem_id, policy) as running:
        wait_for(lambda: host.up, timeout=5, what="connected")
        running.down.set()
        running.wake.set()
        wait_for(lambda: modem.probed == 1 and not running.down.is_set(), timeout=5, what="the probe")
    assert host.up == [modem] and len(host.opened) == 1
    assert _value(metrics.MODEM_WATCHDOG_RESETS, modem_id, "reopen") == 0


def test_a_failed_command_and_no_answer_reopens(modem_id: str) -> None:
    first, second = FakeModem(probes=[False]), FakeModem()
    host = FakeHost([first, second])
    with Running(host, modem_id, SupervisorPolicy(watchdog_s=3600, reconnect_first_s=0.01)) as running:
        wait_for(lambda: host.up, timeout=5, what="connected")
        running.down.set()
        running.wake.set()
        wait_for(lambda: second in host.swept, timeout=5, what="reopened")
    assert first.closed and first.probed == 1


def test_settings_found_reset_count_as_a_reboot_and_reinitialise(modem_id: str) -> None:
    rebooted, fresh = FakeModem(settings=[True, False]), FakeModem()
    host = FakeHost([rebooted, fresh])
    with Running(host, modem_id):
        wait_for(lambda: fresh in host.swept, timeout=10, what="re-initialised after the reboot")
    assert rebooted.closed and rebooted.checked == 2
    assert _value(metrics.MODEM_REBOOTS, modem_id) == 1


def test_settings_refused_twice_after_they_were_readable_count_as_a_restart(modem_id: str) -> None:
    """A real modem restarted with a PIN-locked SIM refuses AT+CNMI? (+CME ERROR: 11) instead of answering."""
    refused = ModemError("AT+CNMI?: +CME ERROR: 11")
    restarted, fresh = FakeModem(settings=[True, refused, refused]), FakeModem()
    host = FakeHost([restarted, fresh])
    with Running(host, modem_id):
        wait_for(lambda: fresh in host.swept, timeout=10, what="re-initialised")
    assert restarted.checked == 3


def test_a_modem_that_never_answers_the_settings_check_is_left_alone(modem_id: str) -> None:
    refused = ModemError("AT+CNMI?: ERROR")
    modem = FakeModem(settings=[refused] * 5)
    host = FakeHost([modem])
    with Running(host, modem_id):
        wait_for(lambda: modem.checked >= 5, timeout=10, what="five settings checks")
        assert len(host.opened) == 1 and not modem.closed


def test_a_boot_line_checks_the_settings_at_once(modem_id: str) -> None:
    rebooted, fresh = FakeModem(settings=[False]), FakeModem()
    host = FakeHost([rebooted, fresh])
    with Running(host, modem_id, SupervisorPolicy(watchdog_s=3600, reconnect_first_s=0.01)) as running:
        wait_for(lambda: host.up, timeout=5, what="connected")
        assert rebooted.checked == 0, "no check before the hint (the watchdog interval is an hour)"
        running.supervisor.boot_hint("RDY")
        wait_for(lambda: fresh in host.swept, timeout=5, what="re-initialised after the boot line")
    assert _value(metrics.MODEM_REBOOTS, modem_id) == 1


def test_a_boot_line_with_settings_intact_changes_nothing(modem_id: str) -> None:
    """^BOOT is periodic noise on some modems: only a settings check, no re-initialisation."""
    modem = FakeModem()
    host = FakeHost([modem])
    with Running(host, modem_id, SupervisorPolicy(watchdog_s=3600, reconnect_first_s=0.01)) as running:
        wait_for(lambda: host.up, timeout=5, what="connected")
        running.supervisor.boot_hint("^BOOT:12345,0,0,0,72")
        wait_for(lambda: modem.checked == 1, timeout=5, what="the settings check")
    assert len(host.opened) == 1 and _value(metrics.MODEM_REBOOTS, modem_id) == 0


def test_recovery_that_keeps_failing_runs_the_reset_command_with_growing_back_off(modem_id: str) -> None:
    runs: list[float] = []

    def run_command(command: str, timeout_s: float, env: dict[str, str]) -> str:
        assert command == "uhubctl -a cycle" and env["SMSGW_MODEM_ID"] == modem_id
        runs.append(time.monotonic())
        return "exit 0"

    host = FakeHost([])  # every connect fails
    policy = SupervisorPolicy(
        watchdog_s=1,
        reconnect_first_s=0.01,
        reconnect_max_s=0.01,
        reset_command="uhubctl -a cycle",
        reset_after=3,
        reset_first_s=0.2,
        reset_max_s=0.4,
    )
    with Running(host, modem_id, policy, run_command=run_command):
        wait_for(lambda: len(runs) >= 4, timeout=10, what="four reset command runs")
    assert len(host.opened) >= 3 + 3, "the first run only after reset_after failed attempts"
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.4, gaps  # doubling, capped
    assert gaps[2] < 0.8, "capped at reset_max_s"
    assert _value(metrics.MODEM_WATCHDOG_RESETS, modem_id, "reset_command") == len(runs)


def test_a_locked_sim_blocks_with_one_critical_line_until_stopped(
    modem_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    locked = FakeModem(connect_error=SimLocked("SIM PIN", "the SIM rejected the configured PIN", rejected=True))
    host = FakeHost([locked])
    with Running(host, modem_id) as running:
        wait_for(lambda: _value(metrics.MODEM_SIM_LOCKED, modem_id) == 1, timeout=5, what="sim_locked metric")
        time.sleep(0.2)  # long enough for several reconnects, if it tried any
        assert len(host.opened) == 1, "a locked SIM is never retried"
        assert running.thread.is_alive(), "blocked, not exited (compose would restart it)"
    assert running.outcome is Outcome.BLOCKED
    critical = _lines(caplog, logging.CRITICAL)
    assert len(critical) == 1 and "SIM locked" in critical[0] and "SMSGW_SIM_PIN" in critical[0]


def test_another_imei_on_the_port_is_refused_before_the_modem_is_touched(
    modem_id: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[str] = []

    def read_imei(port: str, **_kwargs: Any) -> str:
        checked.append(port)
        return "490154203237518"

    monkeypatch.setattr(supervisor_module, "read_imei", read_imei)
    host = FakeHost([FakeModem()])
    with Running(host, modem_id, expected_imei=IDENTITY.imei):
        wait_for(lambda: len(checked) >= 3, timeout=5, what="several identity checks")
    assert host.opened == [], "the modem of another SIM is never initialised, nothing sent through it"
    assert _value(metrics.MODEM_IDENTITY_MISMATCH, modem_id) == 1
    errors = [m for m in _lines(caplog, logging.ERROR) if modem_id in m]
    assert len(errors) == 1 and "490154203237518" in errors[0] and IDENTITY.imei in errors[0]


def test_auto_finds_the_port_whose_modem_has_the_imei(
    modem_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = {
        str(tmp_path / f"modem{i}.tty"): imei
        for i, imei in enumerate(["490154203237518", IDENTITY.imei, "353456789012345"])
    }
    for path in ports:
        Path(path).touch()
    monkeypatch.setattr(supervisor_module, "read_imei", lambda port, **_kw: ports.get(port))
    modem = FakeModem()
    host = FakeHost([modem])
    with Running(host, modem_id, port="auto", expected_imei=IDENTITY.imei, port_globs=[str(tmp_path / "*.tty")]):
        wait_for(lambda: host.up, timeout=5, what="connected")
    assert host.opened == [(str(tmp_path / "modem1.tty"), modem)]
    assert _value(metrics.MODEM_INFO, modem_id, IDENTITY.imei, IDENTITY.iccid, IDENTITY.imsi) == 1


def test_candidate_ports_count_a_device_and_its_link_once(tmp_path: Path) -> None:
    (tmp_path / "ttyUSB0").touch()
    (tmp_path / "by-id").mkdir()
    (tmp_path / "by-id" / "usb-Quectel-if02").symlink_to(tmp_path / "ttyUSB0")
    found = candidate_ports([str(tmp_path / "tty*"), str(tmp_path / "by-id" / "*")])
    assert found == [str(tmp_path / "by-id" / "usb-Quectel-if02")] or found == [str(tmp_path / "ttyUSB0")]


# ---- the SIM's three tries ---------------------------------------------------------------------------------------
def test_a_pin_is_tried_once_per_process_and_a_rejected_pin_never_again(tmp_path: Path) -> None:
    pin = SimPin("1234", str(tmp_path), "modem-a")
    assert pin.pin_to_try() == "1234"
    with pytest.raises(SimLocked, match="already entered"):
        pin.pin_to_try()
    pin.rejected()
    assert "1234" not in pin.record_path.read_text(), "never the PIN itself on disk"
    restarted = SimPin("1234", str(tmp_path), "modem-a")
    with pytest.raises(SimLocked, match="rejected before"):
        restarted.pin_to_try()
    assert SimPin("4321", str(tmp_path), "modem-a").pin_to_try() == "4321", "a fixed PIN is tried once"
    assert SimPin("1234", str(tmp_path), "modem-b").pin_to_try() == "1234", "another modem's SIM is not affected"


def test_an_accepted_pin_is_entered_again_after_a_modem_restart(tmp_path: Path) -> None:
    pin = SimPin("1234", str(tmp_path), "modem-a")
    assert pin.pin_to_try() == "1234"
    pin.accepted()
    assert pin.pin_to_try() == "1234"


def test_no_pin_configured_refuses_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SimLocked, match="set SMSGW_SIM_PIN"):
        SimPin(None, str(tmp_path), "modem-a").pin_to_try()


def _settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"SMSGW_MODEM_PORT": str(tmp_path / "tty"), "SMSGW_STATE_DIR": str(tmp_path), **env})


def test_the_pin_file_wins_and_a_malformed_pin_is_never_shown(tmp_path: Path) -> None:
    (tmp_path / "pin").write_text("5678\n")
    assert configured_pin(_settings(tmp_path, SMSGW_SIM_PIN="1234", SMSGW_SIM_PIN_FILE=str(tmp_path / "pin"))) == "5678"
    assert configured_pin(_settings(tmp_path, SMSGW_SIM_PIN="1234")) == "1234"
    assert configured_pin(_settings(tmp_path)) is None
    with pytest.raises(ConfigError) as bad:
        configured_pin(_settings(tmp_path, SMSGW_SIM_PIN="12a4x"))
    assert "12a4x" not in str(bad.value)
    with pytest.raises(ConfigError, match="SMSGW_SIM_PIN_FILE"):
        configured_pin(_settings(tmp_path, SMSGW_SIM_PIN_FILE=str(tmp_path / "missing")))
    assert "1234" not in repr(_settings(tmp_path, SMSGW_SIM_PIN="1234"))


def test_auto_port_needs_an_imei_and_names_the_modem_after_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SMSGW_MODEM_IMEI"):
        _settings(tmp_path, SMSGW_MODEM_PORT="auto").require_modem_port()
    settings = _settings(tmp_path, SMSGW_MODEM_PORT="auto", SMSGW_MODEM_IMEI=IDENTITY.imei)
    settings.require_modem_port()
    assert settings.modem_id == f"imei-{IDENTITY.imei}"
    with pytest.raises(ConfigError, match="SMSGW_MODEM_IMEI"):
        _settings(tmp_path, SMSGW_MODEM_IMEI="12345")


# ---- the adapter against the in-process simulator: PIN entry and identity -----------------------------------------
@pytest.fixture
def pinned_sim(tmp_path: Path) -> Iterator[Any]:
    from simulator.device import Simulator

    simulator = Simulator(tmp_path / "modem.tty")
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


def _adapter(sim: Any, pin: SimPin | None) -> Any:
    from modem_worker.modem import Modem

    return Modem(
        str(sim.link), on_message=lambda _m: None, on_status_report=lambda _r: None, sim_unlock=pin, command_timeout_s=3
    )


def _sim_state(sim: Any) -> dict[str, Any]:
    return dict(sim.model.state())


def test_adapter_enters_the_right_pin_once_and_reads_the_identity(
    pinned_sim: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the AT debug log too never shows the PIN
    pinned_sim.set_state(pin="1234")
    modem = _adapter(pinned_sim, SimPin("1234", str(tmp_path), "modem-a"))
    try:
        modem.connect()
        identity = modem.read_identity()
    finally:
        modem.close()
    assert _sim_state(pinned_sim)["pin_attempts"] == 1
    assert "AT+CPIN=***" in caplog.text and "1234" not in caplog.text
    assert identity.imei == _sim_state(pinned_sim)["imei"] and identity.iccid and identity.imsi


def test_adapter_enters_a_wrong_pin_once_then_never_again(pinned_sim: Any, tmp_path: Path) -> None:
    pinned_sim.set_state(pin="1234")

    def attempt() -> Any:
        return _adapter(pinned_sim, SimPin("9999", str(tmp_path), "modem-a")).connect()

    with pytest.raises(SimLocked) as first:
        attempt()
    assert first.value.rejected
    with pytest.raises(SimLocked, match="rejected before"):  # a restarted worker: a new SimPin, same state dir
        attempt()
    assert _sim_state(pinned_sim)["pin_attempts"] == 1
