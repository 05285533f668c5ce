"""Old commit against this tree, in one run of the benchmark (issue 12: "no regression within 5 %").

    python -m bench.compare OLD_REV [--rounds 3] [--count 2000] [--modems 4] [--idle-seconds 10] [--callgrind]

Checks ``OLD_REV`` out into a temporary git worktree (removed at the end) and copies this tree's ``bench/`` into
it (the same harness for both trees: only the gateway differs), then runs the throughput phase of
``bench.run`` (``--skip latency --skip replies --skip raw``) alternately in the old tree and in this one,
``--rounds`` times each, so both see the same machine and the same RabbitMQ. Each run is its own
``bench.run`` process with its own vhost, started from its own tree (``scripts/stack.py`` spawns the workers
from the tree it lives in). Reads the figures of each run from ``bench.run``'s report and prints, per tree,
the mean, the median and the spread (lowest-highest), and new/old of the mean and of the median:

* inbound SMS/s, injection -> last arrival;
* CPU ms per SMS: CPU seconds of every modem and sync worker during the throughput phase / SMS count;
* idle RSS per worker (MB), the mean over the workers of one kind;
* with ``--callgrind``: instructions per SMS (callgrind Ir) of the modem workers, of the sync worker and of all,
  net of the idle rate (``bench.run --callgrind``). These do not depend on the machine's load; the wall-clock
  figures of such a run do (valgrind makes the workers ~50x slower), so use a small ``--count`` (300).

Alternating rounds spread the machine's drift over both trees; the median drops one outlier per tree.
"""

from __future__ import annotations

import argparse
import re
import shutil
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
_IR = re.compile(r"^\s+((?:modem|sync)_worker)\d+\s+[0-9]+ Ir/SMS, net\s+(-?[0-9]+) Ir/SMS", re.MULTILINE)


@dataclass(frozen=True)
class Figures:
    """The figures of one ``bench.run`` run."""

    rate: float
    cpu_ms_per_sms: float
    idle_rss_mb: dict[str, float]
    # Net instructions per SMS by worker kind, and "all" (empty without --callgrind).
    ir_per_sms: dict[str, float]


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
    ir: dict[str, float] = {}
    for kind, value in _IR.findall(report):
        ir[kind] = ir.get(kind, 0.0) + float(value)
    if ir:
        ir["all"] = sum(ir.values())
    return Figures(
        rate=float(rate.group(1)),
        cpu_ms_per_sms=1000 * sum(float(seconds) for _name, seconds in cpu) / count,
        idle_rss_mb={kind: statistics.mean(values) for kind, values in by_kind.items()},
        ir_per_sms=ir,
    )


def run_bench(tree: Path, args: argparse.Namespace, callgrind_dir: Path | None = None) -> Figures:
    """One throughput run of ``bench.run`` from ``tree`` (under callgrind, writing into ``callgrind_dir``).

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
    if callgrind_dir is not None:
        command += ["--callgrind", str(callgrind_dir)]
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=1800, check=False)
    return parse(done.stdout + done.stderr, args.count)


def _row(name: str, old: list[float], new: list[float], fmt: str) -> str:
    """One Markdown row: per tree mean, median and spread; new/old of the mean and of the median."""

    def cell(values: list[float]) -> str:
        return (
            f"{statistics.mean(values):{fmt}} / {statistics.median(values):{fmt}} "
            f"({min(values):{fmt}}-{max(values):{fmt}})"
        )

    mean_ratio = statistics.mean(new) / statistics.mean(old)
    median_ratio = statistics.median(new) / statistics.median(old)
    return f"| {name} | {cell(old)} | {cell(new)} | {mean_ratio:.3f} / {median_ratio:.3f} |"


def print_table(old_rev: str, old: list[Figures], new: list[Figures]) -> None:
    """The Markdown table of both trees' runs."""
    print(f"| figure ({len(old)} runs per tree) | old {old_rev}: mean / median (spread) | new: the same | new/old |")
    print("|---|---|---|---|")
    print(_row("inbound SMS/s", [f.rate for f in old], [f.rate for f in new], ".1f"))
    print(_row("CPU ms per SMS", [f.cpu_ms_per_sms for f in old], [f.cpu_ms_per_sms for f in new], ".3f"))
    for kind in sorted(old[0].idle_rss_mb):
        rss_old, rss_new = [f.idle_rss_mb[kind] for f in old], [f.idle_rss_mb[kind] for f in new]
        print(_row(f"idle RSS {kind} MB", rss_old, rss_new, ".1f"))
    for kind in sorted(old[0].ir_per_sms):
        print(
            _row(
                f"instructions per SMS, {kind} (net, k)",
                [f.ir_per_sms[kind] / 1000 for f in old],
                [f.ir_per_sms[kind] / 1000 for f in new],
                ".0f",
            )
        )


def _old_tree(scratch: Path, rev: str) -> Path:
    """A worktree of ``rev`` in ``scratch`` with this tree's ``bench/`` in it."""
    tree = scratch / "old"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True)
    shutil.rmtree(tree / "bench", ignore_errors=True)
    shutil.copytree(ROOT / "bench", tree / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print a Markdown table; 0 when every run gave figures, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="the commit to compare with (e.g. the last commit before a change)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per tree, alternating (default 3)")
    parser.add_argument("--count", type=int, default=2000, help="SMS per throughput run (default 2000)")
    parser.add_argument("--modems", type=int, default=4, help="modems per run (default 4)")
    parser.add_argument("--idle-seconds", type=float, default=10, help="idle window (default 10)")
    parser.add_argument("--callgrind", action="store_true", help="also count instructions per SMS (valgrind)")
    args = parser.parse_args(argv)
    runs: dict[str, list[Figures]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="smsgw-bench-old-") as scratch:
        old_tree = _old_tree(Path(scratch), args.old)
        try:
            for round_no in range(1, args.rounds + 1):
                for label, tree in (("old", old_tree), ("new", ROOT)):
                    out = Path(scratch) / f"callgrind-{label}{round_no}" if args.callgrind else None
                    try:
                        figures = run_bench(tree, args, out)
                    except ValueError as exc:
                        print(f"round {round_no} {label}: {exc}", file=sys.stderr)
                        return 1
                    runs[label].append(figures)
                    print(f"round {round_no} {label}: {figures}", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, check=False)
    print_table(args.old, runs["old"], runs["new"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
