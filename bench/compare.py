"""Old commit against this tree, in one run of the benchmark (issue 12: "no regression within 5 %").

    python -m bench.compare OLD_REV [--rounds 3] [--count 2000] [--modems 4] [--idle-seconds 10]

Checks ``OLD_REV`` out into a temporary git worktree (removed at the end), then runs the throughput phase of
``bench.run`` (``--skip latency --skip replies --skip raw``) alternately in the old tree and in this one,
``--rounds`` times each, so both see the same machine and the same RabbitMQ. Each run is its own
``bench.run`` process with its own vhost, started from its own tree (``scripts/stack.py`` spawns the workers
from the tree it lives in). Reads three figures per run from ``bench.run``'s report and prints the median of
each per tree and new/old:

* inbound SMS/s, injection -> last arrival;
* CPU ms per SMS: CPU seconds of every modem and sync worker during the throughput phase / SMS count;
* idle RSS per worker (MB), the mean over the workers of one kind.

Alternating rounds spread the machine's drift over both trees; the median drops one outlier per tree.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_RATE = re.compile(r"sustained inbound, injection->last\s*:\s*([0-9.]+) SMS/s")
_CPU = re.compile(r"^\s+((?:modem|sync)_worker\d+)\s+([0-9.]+) s CPU", re.MULTILINE)
_RSS = re.compile(r"^\s+((modem|sync)_worker)\d+\s+[0-9.]+ MB \|\s+([0-9.]+) MB \|", re.MULTILINE)


@dataclass(frozen=True)
class Figures:
    """The figures of one ``bench.run`` run."""

    rate: float
    cpu_ms_per_sms: float
    idle_rss_mb: dict[str, float]


def parse(report: str, count: int) -> Figures:
    """The figures in ``report`` (``bench.run``'s output) of a throughput phase of ``count`` SMS.

    Raises:
        ValueError: the report lacks the throughput or footprint lines (the run failed; its output says why).
    """
    rate = _RATE.search(report)
    cpu = _CPU.findall(report)
    rss = _RSS.findall(report)
    if rate is None or not cpu or not rss:
        raise ValueError("no throughput/footprint figures in the report:\n" + report[-3000:])
    by_kind: dict[str, list[float]] = {}
    for kind, _short, value in rss:
        by_kind.setdefault(kind, []).append(float(value))
    return Figures(
        rate=float(rate.group(1)),
        cpu_ms_per_sms=1000 * sum(float(seconds) for _name, seconds in cpu) / count,
        idle_rss_mb={kind: statistics.mean(values) for kind, values in by_kind.items()},
    )


def run_bench(tree: Path, args: argparse.Namespace) -> Figures:
    """One throughput run of ``bench.run`` from ``tree``.

    Raises:
        ValueError: the run printed no figures.
    """
    command = [
        sys.executable,
        "-m",
        "bench.run",
        "--skip",
        "latency",
        "--skip",
        "replies",
        "--skip",
        "raw",
        "--count",
        str(args.count),
        "--modems",
        str(args.modems),
        "--idle-seconds",
        str(args.idle_seconds),
    ]
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=1800, check=False)
    return parse(done.stdout + done.stderr, args.count)


def _median_row(name: str, old: list[float], new: list[float], unit: str) -> str:
    old_m, new_m = statistics.median(old), statistics.median(new)
    return f"| {name} | {old_m:.2f} {unit} | {new_m:.2f} {unit} | {new_m / old_m:.3f} |"


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print a Markdown table; 0 when every run gave figures, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="the commit to compare with (e.g. the last commit before a change)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per tree, alternating (default 3)")
    parser.add_argument("--count", type=int, default=2000, help="SMS per throughput run (default 2000)")
    parser.add_argument("--modems", type=int, default=4, help="modems per run (default 4)")
    parser.add_argument("--idle-seconds", type=float, default=10, help="idle window (default 10)")
    args = parser.parse_args(argv)
    runs: dict[str, list[Figures]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="smsgw-bench-old-") as scratch:
        old_tree = Path(scratch) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.old], cwd=ROOT, check=True)
        try:
            for round_no in range(1, args.rounds + 1):
                for label, tree in (("old", old_tree), ("new", ROOT)):
                    try:
                        figures = run_bench(tree, args)
                    except ValueError as exc:
                        print(f"round {round_no} {label}: {exc}", file=sys.stderr)
                        return 1
                    runs[label].append(figures)
                    print(f"round {round_no} {label}: {figures}", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, check=False)
    old, new = runs["old"], runs["new"]
    print(f"| figure (median of {args.rounds}) | old {args.old} | new | new/old |")
    print("|---|---|---|---|")
    print(_median_row("inbound SMS/s", [f.rate for f in old], [f.rate for f in new], "SMS/s"))
    print(_median_row("CPU ms per SMS", [f.cpu_ms_per_sms for f in old], [f.cpu_ms_per_sms for f in new], "ms"))
    for kind in sorted(old[0].idle_rss_mb):
        print(
            _median_row(
                f"idle RSS {kind}",
                [f.idle_rss_mb[kind] for f in old],
                [f.idle_rss_mb[kind] for f in new],
                "MB",
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
