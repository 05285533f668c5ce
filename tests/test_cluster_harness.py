"""The 3-node cluster harness (scripts/rabbit_cluster.py) without starting RabbitMQ: the nodes' command lines,
environment and files, the parsing of rabbitmqctl's answers, and that kill/teardown act on our PIDs only and
clean up even when the start fails. The cluster run itself is by hand: ``python -m tests.chaos_cluster``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.rabbit_cluster import (
    ClusterError,
    Node,
    NodeSpec,
    RabbitCluster,
    connection_name,
    ctl_argv,
    node_config,
    node_env,
    parse_node_list,
    parse_rows,
    write_cookie,
    write_node_files,
)
from tests.chaos_cluster import Tally, busiest, longest_wait_per_phase


def specs(base: Path) -> list[NodeSpec]:
    return [NodeSpec(i, 25000 + i, 26000 + i, base) for i in (1, 2, 3)]


def test_each_node_has_its_own_name_ports_and_dirs(tmp_path: Path) -> None:
    outer = {"PATH": "/usr/bin", "RABBITMQ_NODENAME": "rabbit@localhost", "RABBITMQ_NODE_PORT": "5672"}
    envs = [node_env(spec, tmp_path, outer) for spec in specs(tmp_path)]
    for key in ("RABBITMQ_NODENAME", "RABBITMQ_NODE_PORT", "RABBITMQ_DIST_PORT", "RABBITMQ_MNESIA_BASE"):
        assert len({env[key] for env in envs}) == 3, f"{key} shared between nodes"
    first = envs[0]
    assert first["RABBITMQ_NODENAME"] == "smsgw-c1@localhost" and first["RABBITMQ_NODE_PORT"] == "25001"
    assert first["RABBITMQ_DIST_PORT"] == "26001"
    assert first["HOME"] == str(tmp_path), "the cookie must come from the cluster's dir, not the default node's"
    assert first["PATH"] == "/usr/bin"
    assert "5672" not in first.values() and "rabbit@localhost" not in first.values()
    for key in ("RABBITMQ_MNESIA_BASE", "RABBITMQ_LOG_BASE", "RABBITMQ_CONFIG_FILE", "RABBITMQ_ENABLED_PLUGINS_FILE"):
        assert Path(first[key]).is_relative_to(tmp_path), f"{key} outside the cluster's dir"
    assert "listeners.tcp.local = 127.0.0.1:25002" in node_config(specs(tmp_path)[1])


def test_node_files_have_no_plugins_and_the_cookie_is_private(tmp_path: Path) -> None:
    spec = specs(tmp_path)[0]
    write_node_files(spec)
    assert (spec.dir / "enabled_plugins").read_text() == "[].\n"  # no management/prometheus port to collide
    assert (spec.dir / "rabbitmq-env.conf").read_text() == ""  # the machine's env file names the default node
    cookie = write_cookie(tmp_path)
    write_cookie(tmp_path)  # again: a read-only cookie is replaced, not an error
    assert cookie.stat().st_mode & 0o777 == 0o400


def test_rabbitmqctl_is_the_real_cli_addressed_to_one_node() -> None:
    argv = ctl_argv("smsgw-c2@localhost", "join_cluster", "smsgw-c1@localhost")
    assert argv[0] == "/usr/lib/rabbitmq/bin/rabbitmqctl"  # not /usr/sbin's wrapper (other user, other cookie)
    assert argv[1:] == ["-n", "smsgw-c2@localhost", "join_cluster", "smsgw-c1@localhost"]


def test_rabbitmqctl_answers_are_parsed() -> None:
    assert parse_node_list("['smsgw-c3@localhost','smsgw-c1@localhost']\n") == [
        "smsgw-c3@localhost",
        "smsgw-c1@localhost",
    ]
    assert parse_node_list("[]") == []
    assert parse_rows("smsgw.outbound\tsmsgw-c2@localhost\n\nq2\tn1\n") == [
        ["smsgw.outbound", "smsgw-c2@localhost"],
        ["q2", "n1"],
    ]
    props = '[{"capabilities",table,[]},{"connection_name",longstr,<<"smsgw-modem-a-consumer">>},{"x",bool,true}]'
    assert connection_name(props) == "smsgw-modem-a-consumer"
    assert connection_name("[]") == "?"


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_kill_and_teardown_act_on_the_started_pids_and_remove_the_dir(tmp_path: Path) -> None:
    base = tmp_path / "cluster"
    base.mkdir()
    nodes = [Node(spec, sleeper()) for spec in specs(base)]
    bystander = sleeper()  # a process the cluster did not start
    cluster = RabbitCluster(base=base, nodes=nodes)
    try:
        pid = cluster.kill("smsgw-c2")
        assert pid not in (nodes[0].popen and nodes[0].popen.pid, None)
        assert not cluster.node("smsgw-c2@localhost").running and cluster.node("smsgw-c1").running
        with pytest.raises(ClusterError, match="not running"):
            cluster.kill("smsgw-c2")
        first = nodes[0].popen
        cluster.teardown()
        assert first is not None and first.returncode is not None
        assert not any(node.running for node in nodes)
        assert not base.exists()
        assert bystander.poll() is None, "teardown stopped a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()
        for node in nodes:
            if node.popen is not None and node.popen.poll() is None:
                node.popen.kill()


class FailingCluster(RabbitCluster):
    """A cluster whose start gets one node up and then fails (a join that times out, say)."""

    def start(self) -> None:
        self.nodes[0].popen = sleeper()
        raise ClusterError("smsgw-c2@localhost did not boot in 120s")


def test_a_failed_start_tears_down_what_it_started(tmp_path: Path) -> None:
    base = tmp_path / "cluster"
    base.mkdir()
    cluster = FailingCluster(base=base, nodes=[Node(spec) for spec in specs(base)])
    with pytest.raises(ClusterError, match="did not boot"), cluster:
        pytest.fail("the body must not run")
    assert not cluster.nodes[0].running and cluster.nodes[0].popen is None
    assert not base.exists()


def test_the_run_fails_on_any_loss_double_park_or_missing_result() -> None:
    clean = Tally(300, 100, 0, 0, 0, 0, 0, 0, 0, 35.2, 40.0)
    assert clean.clean()
    for index in range(2, 9):
        values = [300, 100, 0, 0, 0, 0, 0, 0, 0, 35.2, 40.0]
        values[index] = 1
        assert not Tally(*values).clean(), f"field {index} ignored"  # type: ignore[arg-type]
    assert busiest({"smsgw-c1@localhost": 4, "smsgw-c2@localhost": 9, "smsgw-c3@localhost": 2}) == "smsgw-c2@localhost"


def test_connection_names_in_both_listing_forms() -> None:
    listed = '[{"product","Pika Python Client Library"},{"connection_name","smsgw-sync-default"}]'
    assert connection_name(listed) == "smsgw-sync-default"


def test_waits_are_told_per_phase() -> None:
    sent = {"in steady #1 x": 10.0, "in steady #2 y": 11.0, "in leader-down #3 z": 20.0, "in node-gone #4 w": 30.0}
    seen = {"in steady #1 x": 10.5, "in steady #2 y": 14.0, "in leader-down #3 z": 44.0}
    assert longest_wait_per_phase(sent, seen) == {"steady": 3.0, "leader-down": 24.0}
