"""Keeps one modem usable for the modem worker: find it, connect, serve, watch, recover.

* **Watchdog**: every ``SMSGW_MODEM_WATCHDOG`` seconds, and after any command failed (the worker sets ``down``),
  an ``AT`` probe on a fixed deadline. No answer (or a dead link) -> the port is closed and reopened (what ends a
  firmware hang, like a USB reset), the modem re-initialised and the SIM swept. Recovery that keeps failing
  escalates to ``SMSGW_MODEM_RESET_COMMAND`` (e.g. a USB power cycle) with capped exponential back-off. One
  WARNING when an episode starts, one INFO when the modem is back; ``smsgw_modem_watchdog_resets_total``.
* **Reboot detection**: boot lines (``RDY``, ``+CPIN: READY``, ...) or the periodic check find the settings the
  worker relies on reset (echo, PDU mode, ``+CNMI``) -> the same recovery: re-initialise, sweep the SIM.
* **SIM PIN**: entered by the adapter through :class:`modem_worker.sim_pin.SimPin`; a SIM that stays locked
  blocks the worker (one CRITICAL line, ``smsgw_modem_sim_locked`` 1). The process stays up serving /metrics
  and does nothing else until it is stopped: exiting would make compose restart it into the same SIM.
* **Identity**: with ``SMSGW_MODEM_IMEI`` the IMEI is read before the modem is initialised (``AT+CGSN`` only) and
  another modem is refused; ``SMSGW_MODEM_PORT=auto`` searches the serial ports for that IMEI. At connect, IMEI,
  ICCID and IMSI go to ``smsgw_modem_info`` and the log.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from tenacity import RetryCallState, Retrying, wait_exponential

from modem_worker import metrics
from modem_worker.modem import (
    Modem,
    ModemError,
    ModemIdentity,
    ModemInfo,
    ModemUnavailable,
    SimLocked,
    read_imei,
)
from services import liveness
from services.config import AUTO_PORT

log = logging.getLogger(__name__)

# A boot hint (a boot-like line) triggers a settings check at most this often: ^BOOT is also periodic noise.
_BOOT_CHECK_MIN_S = 5.0
_IDENTITY_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class SupervisorPolicy:
    """Timings of the watchdog and of the recovery."""

    watchdog_s: float = 30.0  # probe + settings check + housekeeping interval (SMSGW_MODEM_WATCHDOG)
    probe_deadline_s: float = 5.0  # fixed deadline of the AT probe
    reconnect_first_s: float = 1.0
    reconnect_max_s: float = 30.0
    reset_command: str = ""  # SMSGW_MODEM_RESET_COMMAND; empty: never escalate
    reset_after: int = 3  # failed recoveries in a row before the reset command runs
    reset_first_s: float = 60.0  # back-off between reset command runs: doubles up to reset_max_s
    reset_max_s: float = 1800.0
    reset_timeout_s: float = 120.0


class Outcome(Enum):
    """How :meth:`ModemSupervisor.run` ended."""

    STOPPED = "stopped"  # stop() was called
    BLOCKED = "blocked"  # the SIM is locked; the worker waited for stop() doing nothing


class Host(Protocol):
    """What the supervisor needs from the worker that owns the modem."""

    def open_modem(self, port: str) -> Modem:
        """A new (unconnected) adapter for ``port`` with the worker's callbacks."""

    def modem_up(self, modem: Modem, info: ModemInfo) -> None:
        """The modem is connected and identified: clear ``down``, start serving (metrics, outbound)."""

    def keep_serving(self) -> bool:
        """Adjust outbound consumption to the modem's health; False while it is not settled (call again soon)."""

    def housekeeping(self, modem: Modem) -> None:
        """Sweep the SIM, read health (sets ``down`` when the modem stops answering)."""

    def modem_down(self) -> None:
        """Stop taking outbound work; returns once the SMS being sent is finished."""


def run_shell(command: str, timeout_s: float, env: dict[str, str]) -> str:
    """Run ``command`` through the shell with ``env`` added; returns "exit N" or "timed out". Never raises."""
    try:
        # The operator's own command line (e.g. uhubctl with its arguments): a shell is the point.
        done = subprocess.run(  # noqa: S602
            command,
            shell=True,
            timeout=timeout_s,
            env={**os.environ, **env},
            capture_output=True,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f} s"
    except OSError as exc:
        return f"could not run ({exc})"
    return f"exit {done.returncode}"


def candidate_ports(patterns: Sequence[str]) -> list[str]:
    """Serial devices matching ``patterns`` (globs), one path per device (a /dev/serial/by-id link and its
    ttyUSB are the same device), sorted."""
    seen: dict[str, str] = {}
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            seen.setdefault(os.path.realpath(path), path)
    return sorted(seen.values())


class Backoff:
    """Delays that double from ``first`` up to ``cap`` (tenacity's ``wait_exponential``), from ``first`` again after
    :meth:`reset`."""

    def __init__(self, first_s: float, cap_s: float) -> None:
        """The first :meth:`next_delay` is ``first_s`` (at most ``cap_s``)."""
        self._wait = wait_exponential(multiplier=first_s, max=cap_s)
        self._state = RetryCallState(Retrying(), None, (), {})

    def next_delay(self) -> float:
        """The delay before the next attempt; each call doubles the one after it, up to the cap."""
        delay = self._wait(self._state)
        self._state.attempt_number += 1
        return delay

    def reset(self) -> None:
        """Start again from the first delay (the thing backed off from worked)."""
        self._state.attempt_number = 1


class ModemSupervisor:
    """Connect -> serve -> watchdog -> recover, for one modem, until stopped (or blocked by a locked SIM)."""

    def __init__(
        self,
        modem_id: str,
        port: str,
        host: Host,
        policy: SupervisorPolicy,
        *,
        stopping: threading.Event,
        down: threading.Event,
        wake: threading.Event,
        expected_imei: str = "",
        port_globs: Sequence[str] = (),
        baudrate: int = 115200,
        run_command: Callable[[str, float, dict[str, str]], str] = run_shell,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``stopping``/``down``/``wake`` are the worker's events: stop requested; the modem failed a command or
        vanished (probe it); look at health and queues again."""
        self._modem_id = modem_id
        self._port = port
        self._host = host
        self._policy = policy
        self._stopping = stopping
        self._down = down
        self._wake = wake
        self._expected_imei = expected_imei
        self._port_globs = tuple(port_globs)
        self._baudrate = baudrate
        self._run_command = run_command
        self._clock = clock
        self._boot_hint = threading.Event()
        self._next_boot_check = 0.0
        # The episode in progress (None: the modem is fine): when it started, what was done about it.
        self._episode_since: float | None = None
        self._reopens = 0
        self._resets = 0
        self._failures = 0  # failed recoveries in a row
        self._reconnect_backoff = Backoff(policy.reconnect_first_s, policy.reconnect_max_s)
        self._reset_backoff = Backoff(policy.reset_first_s, policy.reset_max_s)
        self._next_reset = 0.0
        self._mismatch_logged = False
        self._inconclusive = 0  # settings checks in a row that could not tell
        self._settings_readable = False  # a settings check worked on the current connection
        self._identity: ModemIdentity | None = None
        self.port_in_use: str | None = None  # the port of the current connection (auto: the one found)
        metrics.MODEM_SIM_LOCKED.labels(modem_id).set(0)
        metrics.MODEM_IDENTITY_MISMATCH.labels(modem_id).set(0)
        metrics.MODEM_REBOOTS.labels(modem_id)
        metrics.MODEM_RECONNECTS.labels(modem_id)
        metrics.MODEM_UP.labels(modem_id).set(0)
        for action in metrics.WATCHDOG_ACTIONS:
            metrics.MODEM_WATCHDOG_RESETS.labels(modem_id, action)

    @property
    def identity(self) -> ModemIdentity | None:
        """IMEI, ICCID, IMSI of the modem last connected (None before the first connect)."""
        return self._identity

    def boot_hint(self, line: str) -> None:
        """The adapter saw a boot-like line (read thread; must not block): check the settings soon."""
        log.debug("modem %s: boot-like line %r; checking its settings", self._modem_id, line[:20])
        self._boot_hint.set()
        self._wake.set()

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> Outcome:
        """Keep the modem connected until ``stopping`` is set; returns BLOCKED (after ``stopping``) when a locked
        SIM blocked the worker."""
        try:
            return self._supervise()
        finally:
            liveness.done()

    def _supervise(self) -> Outcome:
        """The loop of ``run``, stamping the liveness heartbeat every turn (services/liveness.py)."""
        self._reconnect_backoff.reset()
        while not self._stopping.is_set():
            liveness.beat()
            try:
                modem = self._connect()
            except SimLocked as exc:
                self._block(exc)
                return Outcome.BLOCKED
            if modem is None:
                self._recovery_failed()
                delay = self._reconnect_backoff.next_delay()
                liveness.beat(delay)
                self._stopping.wait(delay)
                continue
            self._reconnect_backoff.reset()
            try:
                trouble = self._serve(modem)
            finally:
                self._host.modem_down()
                modem.close()
                metrics.MODEM_UP.labels(self._modem_id).set(0)
            if trouble is not None:
                self._trouble(trouble)
                metrics.MODEM_WATCHDOG_RESETS.labels(self._modem_id, "reopen").inc()
                self._reopens += 1
        return Outcome.STOPPED

    def _connect(self) -> Modem | None:
        """Find, open, initialise and identify the modem; None when it is not available (yet).
        Raises SimLocked."""
        port = self._resolve_port()
        if port is None:
            return None
        modem = self._host.open_modem(port)
        try:
            info = modem.connect()
            identity = modem.read_identity()
        except ModemUnavailable as exc:
            modem.close()
            self._trouble(f"not available on {port} ({exc})")
            return None
        if self._expected_imei and identity.imei != self._expected_imei:  # swapped between the check and now
            modem.close()
            self._mismatch(port, identity.imei)
            return None
        if self.port_in_use is not None:  # a reconnection (not a connect attempt): SmsgwModemReconnecting
            metrics.MODEM_RECONNECTS.labels(self._modem_id).inc()
        self.port_in_use = port
        self._announce(identity, port)
        self._host.modem_up(modem, info)
        return modem

    def _serve(self, modem: Modem) -> str | None:
        """Serve until the modem needs recovery (returns why) or the worker stops (returns None)."""
        metrics.MODEM_UP.labels(self._modem_id).set(1)
        self._inconclusive, self._settings_readable = 0, False
        self._host.housekeeping(modem)  # SMS stored while we were away
        self._recovered()
        next_watch = self._clock() + self._policy.watchdog_s
        while True:
            liveness.beat()
            settled = self._host.keep_serving()
            timeout = max(0.0, next_watch - self._clock()) if settled else 1.0
            liveness.beat(timeout)
            self._wake.wait(timeout)
            # Cleared before looking again: a wake-up from now on is seen by the next keep_serving().
            self._wake.clear()
            if self._stopping.is_set():
                return None
            if self._down.is_set():
                # A command failed or the link died: probe before deciding.
                if not modem.alive:
                    return "its link was lost"
                if not modem.probe(self._policy.probe_deadline_s):
                    return "it did not answer AT after a failed command"
                log.info("modem %s: a command failed but the modem answers AT; carrying on", self._modem_id)
                self._down.clear()
                continue
            now = self._clock()
            watch_due = now >= next_watch
            boot_due = self._boot_hint.is_set() and now >= self._next_boot_check
            if not (watch_due or boot_due):
                continue
            self._boot_hint.clear()
            self._next_boot_check = now + _BOOT_CHECK_MIN_S
            trouble = self._watch(modem)
            if trouble is not None:
                return trouble
            if watch_due:
                next_watch = self._clock() + self._policy.watchdog_s
                self._host.housekeeping(modem)

    def _watch(self, modem: Modem) -> str | None:
        """One watchdog round: the probe, then the settings check. Returns why the modem needs recovery."""
        if not modem.probe(self._policy.probe_deadline_s):
            return f"it did not answer AT within {self._policy.probe_deadline_s:g} s"
        try:
            held = modem.settings_hold()
        except ModemUnavailable:
            return "it stopped answering"
        except ModemError as exc:
            # Refused or garbled: once may be noise; twice in a row means the modem changed under us (a real
            # modem that restarted with a PIN-locked SIM refuses +CNMI? with +CME ERROR: 11).
            # Only after the check worked on this connection: a modem that never answers it is not restarting.
            self._inconclusive += 1
            log.debug("modem %s: settings check inconclusive (%s)", self._modem_id, exc)
            if self._inconclusive < 2 or not self._settings_readable:
                return None
            held = False
        else:
            self._settings_readable = True
        self._inconclusive = 0
        if held:
            return None
        metrics.MODEM_REBOOTS.labels(self._modem_id).inc()
        return "it restarted (its settings were reset)"

    # ---- episodes: one WARNING when trouble starts, one INFO when the modem is back ------------------------------
    def _trouble(self, why: str) -> None:
        if self._episode_since is not None:
            log.debug("modem %s: still not back: %s", self._modem_id, why)
            return
        self._episode_since = self._clock()
        self._reopens = self._resets = 0
        log.warning(
            "modem %s: %s; reopening the port and re-initialising it (SMS stay on the SIM, outbound work "
            "waits in RabbitMQ; replies move to other modems after SMSGW_MODEM_FAILOVER)",
            self._modem_id,
            why,
        )

    def _recovered(self) -> None:
        self._failures = 0
        self._reset_backoff.reset()
        self._next_reset = 0.0
        if self._episode_since is None:
            return
        log.info(
            "modem %s: back after %.0f s (%d reopen(s), %d reset command run(s)); SIM swept",
            self._modem_id,
            self._clock() - self._episode_since,
            self._reopens,
            self._resets,
        )
        self._episode_since = None

    def _recovery_failed(self) -> None:
        """A connect attempt failed: escalate to the reset command when that keeps happening."""
        self._failures += 1
        command = self._policy.reset_command
        now = self._clock()
        if not command or self._failures < self._policy.reset_after or now < self._next_reset:
            return
        self._next_reset = now + self._reset_backoff.next_delay()
        metrics.MODEM_WATCHDOG_RESETS.labels(self._modem_id, "reset_command").inc()
        self._resets += 1
        env = {"SMSGW_MODEM_ID": self._modem_id, "SMSGW_MODEM_PORT": self.port_in_use or self._port}
        result = self._run_command(command, self._policy.reset_timeout_s, env)
        log.warning(
            "modem %s: ran SMSGW_MODEM_RESET_COMMAND after %d failed attempts (%s); next run not before %.0f s",
            self._modem_id,
            self._failures,
            result,
            self._next_reset - now,
        )

    # ---- identity -------------------------------------------------------------------------------------------
    def _resolve_port(self) -> str | None:
        """The port to open: the configured one (its IMEI checked first when SMSGW_MODEM_IMEI is set), or with
        auto the serial port whose modem has SMSGW_MODEM_IMEI. None when there is none to open now."""
        if self._port != AUTO_PORT:
            if not self._expected_imei:
                return self._port
            imei = read_imei(self._port, baudrate=self._baudrate, timeout_s=_IDENTITY_TIMEOUT_S)
            if imei is None:
                self._trouble(f"no IMEI from {self._port} (missing, busy or not answering)")
                return None
            if imei != self._expected_imei:
                self._mismatch(self._port, imei)
                return None
            return self._port
        candidates = candidate_ports(self._port_globs)
        for port in candidates:
            if read_imei(port, baudrate=self._baudrate, timeout_s=_IDENTITY_TIMEOUT_S) == self._expected_imei:
                return port
        self._mismatch(None, None, searched=len(candidates))
        return None

    def _mismatch(self, port: str | None, imei: str | None, searched: int = 0) -> None:
        """The expected modem is not there: refuse, one ERROR line per episode, metric 1 until it is found."""
        metrics.MODEM_IDENTITY_MISMATCH.labels(self._modem_id).set(1)
        if self._mismatch_logged:
            return
        self._mismatch_logged = True
        self._episode_since = self._episode_since or self._clock()
        if port is not None:
            log.error(
                "modem %s: refused the modem on %s: its IMEI is %s, not SMSGW_MODEM_IMEI=%s; nothing is sent "
                "or received through it (one SIM's queue never leaves through another). Fix the port "
                "(udev name, or SMSGW_MODEM_PORT=auto); checking again every %.0f s",
                self._modem_id,
                port,
                imei,
                self._expected_imei,
                self._policy.reconnect_max_s,
            )
        else:
            log.error(
                "modem %s: no serial port among %s (%d searched) has a modem with IMEI %s; nothing is sent; "
                "checking again every %.0f s",
                self._modem_id,
                ",".join(self._port_globs),
                searched,
                self._expected_imei,
                self._policy.reconnect_max_s,
            )

    def _announce(self, identity: ModemIdentity, port: str) -> None:
        """Export and log who the modem is (once per connection); the previous info series goes."""
        metrics.MODEM_IDENTITY_MISMATCH.labels(self._modem_id).set(0)
        self._mismatch_logged = False
        old = self._identity
        if old is not None and old != identity:
            metrics.MODEM_INFO.remove(self._modem_id, old.imei, old.iccid, old.imsi)
        metrics.MODEM_INFO.labels(self._modem_id, identity.imei, identity.iccid, identity.imsi).set(1)
        self._identity = identity
        log.info(
            "modem %s: on %s: IMEI %s, ICCID %s, IMSI %s",
            self._modem_id,
            port,
            identity.imei or "unknown",
            identity.iccid or "unknown",
            identity.imsi or "unknown",
        )

    # ---- a locked SIM -----------------------------------------------------------------------------------------
    def _block(self, exc: SimLocked) -> None:
        """One CRITICAL line, the metric, then nothing until stopped (the process stays up for /metrics)."""
        metrics.MODEM_UP.labels(self._modem_id).set(0)
        metrics.MODEM_SIM_LOCKED.labels(self._modem_id).set(1)
        if exc.rejected:
            todo = (
                "; fix SMSGW_SIM_PIN / SMSGW_SIM_PIN_FILE (this PIN is never entered again automatically: the SIM "
                "allows 3 tries), then restart the worker"
            )
        elif "PUK" in exc.state:
            todo = "; unlock the SIM with its PUK in a phone, then restart the worker"
        else:
            todo = ""  # the detail says what to do
        log.critical(
            "modem %s: SIM locked (%s): %s%s. Until then this worker sends, receives and enters nothing.",
            self._modem_id,
            exc.state,
            exc.detail,
            todo,
        )
        # Waiting here is the point, not a hang: a liveness exit would restart the worker into the SIM's PIN tries.
        liveness.done()
        self._stopping.wait()
