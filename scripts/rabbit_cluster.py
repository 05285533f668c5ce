"""A 3-node RabbitMQ cluster on one machine, beside the machine's own RabbitMQ (which it never touches).

Each node has its own name (``smsgw-c1@localhost`` …), AMQP port, Erlang distribution port, config, plugins
file (no plugins: no management or prometheus port to collide with the default node's) and mnesia/log dirs
under one temporary directory. The nodes run as the current user (root on the test machine) with ``HOME``
pointing at that directory, which holds their shared Erlang cookie, so the default node's cookie is neither read
nor changed. ``rabbitmqctl`` is the real one under /usr/lib/rabbitmq/bin (the /usr/sbin wrapper switches to the
rabbitmq user and its cookie) and every call has a timeout.

Each node is started as ``erl`` directly (``RABBITMQ_ALLOW_INPUT``: the wrapper then execs instead of waiting in
a shell that ignores SIGTERM), so the PID we started is the node's ``beam.smp``: ``kill`` SIGKILLs exactly that
PID and ``stop`` SIGTERMs it. Nothing is stopped by name.

By hand::

    python -m scripts.rabbit_cluster up      # start, join, print SMSGW_AMQP_URL, wait for Ctrl-C, tear down

Used by the cluster scenario runner (``python -m tests.chaos_cluster``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from scripts.stack import free_port

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
CTL_TIMEOUT_S = 60.0  # any one rabbitmqctl call; a hung node must fail the run, not hang it
BOOT_TIMEOUT_S = 120.0
COOKIE = "SMSGWCLUSTERCOOKIEDONOTUSEINPRODUCTION"


class ClusterError(RuntimeError):
    """A node did not start, join or answer in time (the message says which, and where its log is)."""


@dataclass(frozen=True)
class NodeSpec:
    """Where one node lives: its name, ports and directories (all fixed for the cluster's life, so a restarted
    node comes back as the same member)."""

    index: int
    amqp_port: int
    dist_port: int
    base: Path
    prefix: str = "smsgw-c"

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.index}@localhost"

    @property
    def short(self) -> str:
        return f"{self.prefix}{self.index}"

    @property
    def dir(self) -> Path:
        return self.base / self.short

    def amqp_url(self, vhost: str = "%2F") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/{vhost}"


def node_config(spec: NodeSpec) -> str:
    """The node's rabbitmq.conf: its own AMQP listener on loopback; guest may log in (loopback only anyway)."""
    return (
        f"listeners.tcp.local = 127.0.0.1:{spec.amqp_port}\n"
        "loopback_users.guest = true\n"
        "cluster_partition_handling = pause_minority\n"
        # the disk monitor's default (50 MB) is fine; the memory watermark of one of three nodes on a small machine
        # is not: a node under alarm blocks publishers, which is a different scenario
        "vm_memory_high_watermark.relative = 0.8\n"
    )


def node_env(spec: NodeSpec, home: Path, base_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment one node (and ``rabbitmqctl`` talking to it) runs with: own name, ports, dirs, config,
    no plugins, and ``HOME`` holding the cluster's cookie. Variables of the default node are dropped."""
    env = {k: v for k, v in (base_env if base_env is not None else os.environ).items() if not k.startswith("RABBITMQ_")}
    node_dir = spec.dir
    env.update(
        {
            "HOME": str(home),
            "RABBITMQ_NODENAME": spec.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(spec.amqp_port),
            "RABBITMQ_DIST_PORT": str(spec.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(node_dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(node_dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(node_dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node_dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(node_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node_dir / "log"),
            "RABBITMQ_PID_FILE": str(node_dir / "node.pid"),
            "RABBITMQ_ALLOW_INPUT": "1",  # exec the VM (its PID is ours), see the module docstring
            "RABBITMQ_SERVER_START_ARGS": "-noinput",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
    )
    return env


def ctl_argv(node: str, *args: str) -> list[str]:
    """The command line of ``rabbitmqctl -n node args`` (the real CLI, not the wrapper that switches users)."""
    return [str(RABBIT_BIN / "rabbitmqctl"), "-n", node, *args]


def server_argv() -> list[str]:
    return [str(RABBIT_BIN / "rabbitmq-server")]


def write_node_files(spec: NodeSpec) -> None:
    """Create the node's directories and its config, env and plugins files."""
    for sub in ("mnesia", "log"):
        (spec.dir / sub).mkdir(parents=True, exist_ok=True)
    (spec.dir / "rabbitmq.conf").write_text(node_config(spec), encoding="utf-8")
    (spec.dir / "advanced.config").write_text("[].\n", encoding="utf-8")
    (spec.dir / "enabled_plugins").write_text("[].\n", encoding="utf-8")
    (spec.dir / "rabbitmq-env.conf").write_text("", encoding="utf-8")


def write_cookie(home: Path, cookie: str = COOKIE) -> Path:
    """Write the shared Erlang cookie to ``home/.erlang.cookie`` with mode 0400 (Erlang refuses wider)."""
    path = home / ".erlang.cookie"
    if path.exists():
        path.chmod(0o600)
    path.write_text(cookie, encoding="ascii")
    path.chmod(0o400)
    return path


@dataclass
class Node:
    """A started node: its spec and its ``beam.smp`` process (None when stopped or killed)."""

    spec: NodeSpec
    popen: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class RabbitCluster:
    """Three (``size``) nodes joined into one cluster; a context manager that tears everything down on exit."""

    size: int = 3
    base: Path | None = None
    nodes: list[Node] = field(default_factory=list)
    keep_dir: bool = False

    def __post_init__(self) -> None:
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="smsgw-cluster-"))
        if not self.nodes:
            self.nodes = [Node(NodeSpec(i, free_port(), free_port(), self.base)) for i in range(1, self.size + 1)]

    @property
    def home(self) -> Path:
        assert self.base is not None
        return self.base

    def __enter__(self) -> RabbitCluster:
        try:
            self.start()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.teardown()

    def node(self, name: str) -> Node:
        """The node called ``name`` (``smsgw-c2@localhost`` or ``smsgw-c2``). Raises KeyError."""
        for node in self.nodes:
            if name in (node.spec.name, node.spec.short):
                return node
        raise KeyError(name)

    def amqp_url(self, vhost: str = "%2F") -> str:
        """``SMSGW_AMQP_URL`` listing every node (comma separated)."""
        return ",".join(node.spec.amqp_url(vhost) for node in self.nodes)

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every node, join nodes 2.. to node 1, wait until all run the app and see each other.
        Raises ClusterError."""
        write_cookie(self.home)
        for node in self.nodes:
            write_node_files(node.spec)
            self._spawn(node)
        for node in self.nodes:
            self.wait_booted(node)
        first = self.nodes[0].spec.name
        for node in self.nodes[1:]:
            self.ctl(node.spec.name, "stop_app")
            self.ctl(node.spec.name, "join_cluster", first)
            self.ctl(node.spec.name, "start_app")
        self.wait_members(len(self.nodes))

    def _spawn(self, node: Node) -> None:
        if node.log is not None:
            node.log.close()
        node.log = (node.spec.dir / "console.log").open("ab")
        node.popen = subprocess.Popen(
            server_argv(),
            env=node_env(node.spec, self.home),
            stdin=subprocess.DEVNULL,
            stdout=node.log,
            stderr=subprocess.STDOUT,
            cwd=node.spec.dir,
            start_new_session=True,  # a Ctrl-C on the runner's terminal reaches the runner, which tears down
        )

    def wait_booted(self, node: Node, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Wait until ``node`` runs the rabbit app (``rabbitmqctl await_startup``); check its PID is the one we
        started. Raises ClusterError."""
        deadline = time.monotonic() + timeout
        while True:
            if not node.running:
                raise ClusterError(f"{node.spec.name} exited at start: see {node.spec.dir / 'console.log'}")
            done = self.ctl(node.spec.name, "await_startup", "--timeout", "10", check=False, timeout=30)
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.spec.name} did not boot in {timeout:.0f}s: {done.stderr.strip()[-300:]}")
        pid = self.beam_pid(node.spec.name)
        if node.popen is not None and pid != node.popen.pid:
            raise ClusterError(f"{node.spec.name}: beam PID {pid} is not the started PID {node.popen.pid}")

    def wait_members(self, count: int, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Wait until node 1's view lists ``count`` running nodes. Raises ClusterError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = self.running_nodes()
            if len(running) >= count:
                return
            time.sleep(1)
        raise ClusterError(f"the cluster did not reach {count} running nodes in {timeout:.0f}s")

    def kill(self, name: str) -> int:
        """SIGKILL the node's beam.smp (by its PID) and reap it; returns the PID."""
        node = self.node(name)
        if node.popen is None:
            raise ClusterError(f"{name} is not running")
        pid = node.popen.pid
        if node.popen.poll() is None:
            os.kill(pid, signal.SIGKILL)
        node.popen.wait(timeout=30)
        node.popen = None
        return pid

    def restart(self, name: str) -> None:
        """Start a killed or stopped node again (same name, ports, data) and wait until it runs and rejoined."""
        node = self.node(name)
        if node.running:
            raise ClusterError(f"{name} is still running")
        self._spawn(node)
        self.wait_booted(node)
        self.wait_members(sum(1 for n in self.nodes if n.running))

    def stop_node(self, node: Node, timeout: float = 30.0) -> None:
        """SIGTERM the node by PID (a clean stop), SIGKILL it after ``timeout``; close its log."""
        if node.popen is not None and node.popen.poll() is None:
            os.kill(node.popen.pid, signal.SIGTERM)
            try:
                node.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(node.popen.pid, signal.SIGKILL)
                node.popen.wait(timeout=30)
        node.popen = None
        if node.log is not None:
            node.log.close()
            node.log = None

    def teardown(self) -> None:
        """Stop every node we started (by PID) and delete the cluster's directory (unless ``keep_dir``)."""
        for node in self.nodes:
            try:
                self.stop_node(node)
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"could not stop {node.spec.name}: {exc}", file=sys.stderr)
        if self.base is not None and not self.keep_dir:
            shutil.rmtree(self.base, ignore_errors=True)

    # --- rabbitmqctl ----------------------------------------------------------------------------------------

    def ctl(
        self, node: str, *args: str, check: bool = True, timeout: float = CTL_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n node args`` with a timeout. Raises ClusterError when it fails (``check``) or
        does not answer in time."""
        spec = self.node(node).spec
        try:
            done = subprocess.run(
                ctl_argv(spec.name, *args),
                env=node_env(spec, self.home),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            if not check:
                return subprocess.CompletedProcess(ctl_argv(spec.name, *args), 124, "", "timed out")
            what = f"rabbitmqctl -n {spec.name} {' '.join(args)}"
            raise ClusterError(f"{what} did not answer in {timeout:.0f}s") from None
        if check and done.returncode != 0:
            raise ClusterError(
                f"rabbitmqctl -n {spec.name} {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-300:]}"
            )
        return done

    def any_running(self) -> str:
        """The name of a node that runs (for queries). Raises ClusterError when none does."""
        for node in self.nodes:
            if node.running:
                return node.spec.name
        raise ClusterError("no node of the cluster runs")

    def beam_pid(self, name: str) -> int:
        """The OS PID of the node's VM, as the node itself says (``os:getpid()``)."""
        out = self.ctl(name, "eval", "os:getpid().").stdout.strip()
        return int(out.strip('"'))

    def running_nodes(self) -> list[str]:
        """Names of the nodes the cluster says are running (empty when the asked node does not answer)."""
        done = self.ctl(self.any_running(), "eval", "rabbit_nodes:all_running().", check=False, timeout=30)
        return parse_node_list(done.stdout) if done.returncode == 0 else []

    def table(self, *args: str) -> list[list[str]]:
        """A ``rabbitmqctl`` listing (``list_queues name leader`` …) as rows of tab-separated cells."""
        done = self.ctl(self.any_running(), *args, "--quiet", "--no-table-headers")
        return parse_rows(done.stdout)

    def queue_leaders(self, vhost: str = "/") -> dict[str, str]:
        """Queue name → the node leading it (quorum queues)."""
        return {row[0]: row[1] for row in self.table("list_queues", "-p", vhost, "name", "leader") if len(row) > 1}

    def connections_per_node(self, vhost: str | None = None) -> dict[str, list[str]]:
        """Node name → the client-given names of the connections on it (``list_connections``), in the order
        listed."""
        args = ["list_connections", "port", "client_properties"]
        if vhost is not None:
            args = ["list_connections", "-p", vhost, "port", "client_properties"]
        by_port = {str(node.spec.amqp_port): node.spec.name for node in self.nodes}
        spread: dict[str, list[str]] = {node.spec.name: [] for node in self.nodes}
        for row in self.table(*args):
            if len(row) < 2:
                continue
            spread.setdefault(by_port.get(row[0], row[0]), []).append(connection_name(row[1]))
        return spread


def parse_node_list(text: str) -> list[str]:
    """``['smsgw-c1@localhost','smsgw-c2@localhost']`` (an Erlang list of atoms) → the names."""
    inner = text.strip().strip("[]").replace("\n", "")
    return [item.strip().strip("'") for item in inner.split(",") if item.strip()]


def parse_rows(text: str) -> list[list[str]]:
    """Tab-separated rows of a quiet ``rabbitmqctl`` listing."""
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def connection_name(client_properties: str) -> str:
    """The ``connection_name`` inside a listed connection's client properties ("?" when it has none).
    rabbitmqctl shows it as ``{"connection_name","smsgw-sync-default"}`` (3.10) or, in the raw AMQP table form,
    ``{"connection_name",longstr,<<"smsgw-sync-default">>}``."""
    found = re.search(r'\{"connection_name",(?:longstr,<<)?"([^"]*)"', client_properties)
    return found.group(1) if found else "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A 3-node RabbitMQ cluster on this machine, by hand.")
    parser.add_argument("command", choices=["up"], help="up: start and join, wait for Ctrl-C, tear down")
    parser.add_argument("--size", type=int, default=3)
    args = parser.parse_args(argv)
    with RabbitCluster(size=args.size) as cluster:
        print(f"SMSGW_AMQP_URL={cluster.amqp_url()}", flush=True)
        for node in cluster.nodes:
            print(f"{node.spec.name} pid {node.popen.pid if node.popen else '-'} dir {node.spec.dir}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
