"""The benchmark's result table (``python -m bench.run``), each figure next to its target."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from bench.measure import CpuWindow

TARGET_INBOUND_PER_S = 500.0
TARGET_P99_MS = 50.0
TARGET_IDLE_RSS_MB = 60.0
TARGET_IDLE_CPU_PCT = 1.0  # "near 0 %"
NAN = float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(
    args: argparse.Namespace,
    results: dict[str, dict[str, Any]],
    cpu: CpuWindow,
    peak: dict[str, float],
    idle: dict[str, tuple[float, float]],
) -> None:
    """Print every phase's figures (those of the phases that ran) and the footprint of every worker."""
    print(
        f"\n===== results ({args.modems} modems, {args.sync_workers} sync worker(s), "
        f"SMSGW_LOG_LEVEL={args.log_level}, load average now {os.getloadavg()[0]:.2f}) ====="
    )
    gateway_rate = NAN
    if "throughput" in results:
        gateway_rate = _throughput(results["throughput"], cpu)
    if "latency" in results:
        _latency(results["latency"])
    if "replies" in results:
        r = results["replies"]
        print(
            f"reply        {r['count']} round trips (missing {r['missing']}, sent twice {r['duplicated']}): "
            f"p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, max {r['max']:.1f} ms (outbox polled every 5 ms)"
        )
    _footprint(peak, idle)
    if "raw" in results:
        _raw(results["raw"], args.raw_publishers, gateway_rate)
    sys.stdout.flush()


def _throughput(r: dict[str, Any], cpu: CpuWindow) -> float:
    """Print the throughput phase; returns the gateway's rate (injection to last arrival, SMS/s)."""
    gateway_rate: float = r.get("start_to_last", NAN)
    print(
        f"throughput   {r['count']} SMS: lost {r['lost']}, duplicated {r['duplicated']} "
        f"[{verdict(r['lost'] == 0 and r['duplicated'] == 0)} 0/0]"
    )
    print(f"  sustained inbound, first->last arrival : {r.get('first_to_last', NAN):8.1f} SMS/s")
    print(
        f"  sustained inbound, injection->last     : {gateway_rate:8.1f} SMS/s   target >= "
        f"{TARGET_INBOUND_PER_S:.0f} [{verdict(gateway_rate >= TARGET_INBOUND_PER_S)}]"
    )
    print(
        f"  injection took {r['injection_s']:.2f} s; latency under saturation p50 "
        f"{r.get('lat_p50', NAN):.0f} ms, p99 {r.get('lat_p99', NAN):.0f} ms; "
        f"longest gap between arrivals {1000 * r.get('max_gap', NAN):.0f} ms"
    )
    if cpu.used:
        print(
            f"  CPU during the phase ({cpu.wall:.1f} s wall, machine {cpu.machine_pct:.0f} % of "
            f"{os.cpu_count()} cores):"
        )
        for name in cpu.pids:
            print(f"    {name:<20} {cpu.used[name]:6.2f} s CPU = {cpu.pct(name):5.1f} % of one core")
    return gateway_rate


def _latency(r: dict[str, Any]) -> None:
    print(
        f"latency      {r['count']} SMS at {r['achieved_rate']:.1f} SMS/s ({r['late_posts']} posts late): "
        f"lost {r['lost']}, duplicated {r['duplicated']}"
    )
    print(
        f"  POST /sms -> Sync URL: p50 {r['p50']:.1f} ms, p90 {r['p90']:.1f} ms, p99 {r['p99']:.1f} ms, "
        f"max {r['max']:.1f} ms   target p99 <= {TARGET_P99_MS:.0f} ms [{verdict(r['p99'] <= TARGET_P99_MS)}]"
    )


def _footprint(peak: dict[str, float], idle: dict[str, tuple[float, float]]) -> None:
    print("footprint    peak RSS (VmHWM) | idle RSS | idle CPU")
    for name, high in peak.items():
        rss, pct = idle[name]
        ok = rss <= TARGET_IDLE_RSS_MB and pct <= TARGET_IDLE_CPU_PCT
        print(
            f"  {name:<16} {high:6.1f} MB | {rss:6.1f} MB | {pct:5.2f} %   target <= {TARGET_IDLE_RSS_MB:.0f} MB, "
            f"<= {TARGET_IDLE_CPU_PCT:g} % [{verdict(ok)}]"
        )


def _raw(r: dict[str, Any], publishers: int, gateway_rate: float) -> None:
    raw_rate = r.get("start_to_last", NAN)
    print(
        f"raw limit    {r['count']} msgs ({publishers} publisher(s)): lost {r['lost']}, "
        f"duplicated {r['duplicated']}; confirmed publishes {r['publish_rate']:.1f} msg/s"
    )
    print(
        f"  publish-with-confirm -> consume -> POST -> ack: first->last {r.get('first_to_last', 0):.1f} "
        f"msg/s, start->last {raw_rate:.1f} msg/s"
    )
    print(
        f"  gateway / raw = {gateway_rate / raw_rate:.2f}"
        if raw_rate == raw_rate and raw_rate
        else "  gateway / raw = n/a"
    )
