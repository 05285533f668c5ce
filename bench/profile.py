"""Print what the workers did per SMS in a ``bench.run --profile DIR`` run (optionally against an older run).

    python -m bench.profile DIR COUNT [--old OLD_DIR] [--top 25] [--sort tottime|calls]

Subtracts each worker's ``<name>.start.pstats`` from its ``<name>.end.pstats`` (the throughput phase only),
adds up the workers of one kind (``modem_worker*``, ``sync_worker*``) and prints, per kind: Python function
calls per SMS (a load-independent figure), profiled CPU ms per SMS, and the functions with the most own time
(or calls) per SMS. With ``--old``, the same for the older run side by side, by function name.
"""

from __future__ import annotations

import argparse
import pstats
import sys
from collections import defaultdict
from pathlib import Path

# (file, line, function) -> (primitive calls, calls, own time, cumulative time)
Table = dict[tuple[str, int, str], tuple[int, int, float, float]]


def _load(path: Path) -> Table:
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    return {func: (cc, nc, tt, ct) for func, (cc, nc, tt, ct, _callers) in stats.items()}


def phase(directory: Path, kind: str) -> Table:
    """The end-minus-start statistics of every ``kind*`` worker in ``directory``, added up by function."""
    total: dict[tuple[str, int, str], list[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0])
    for end in sorted(directory.glob(f"{kind}*.end.pstats")):
        start = _load(end.with_name(end.name.replace(".end.", ".start.")))
        for func, values in _load(end).items():
            before = start.get(func, (0, 0, 0.0, 0.0))
            for i in range(4):
                total[func][i] += values[i] - before[i]
    return {func: (int(v[0]), int(v[1]), v[2], v[3]) for func, v in total.items()}


def _short(func: tuple[str, int, str]) -> str:
    path, line, name = func
    parts = Path(path).parts
    where = "/".join(parts[-2:]) if path != "~" else ""
    return f"{where}:{line}({name})" if where else name


def _by_name(table: Table) -> dict[str, tuple[int, int, float, float]]:
    """Key by a path-independent name (the last two path parts), so two trees' tables line up."""
    return {_short(func): values for func, values in table.items()}


def show(kind: str, count: int, new: Table, old: Table | None, top: int, sort: str) -> None:
    """Print one worker kind's totals and top functions per SMS."""
    key = 2 if sort == "tottime" else 1
    for label, table in (("new", new), ("old", old)):
        if table is not None:
            calls = sum(v[1] for v in table.values())
            cpu = sum(v[2] for v in table.values())
            print(f"{kind} ({label}): {calls / count:.0f} Python calls/SMS, {1000 * cpu / count:.3f} profiled ms/SMS")
    new_n, old_n = _by_name(new), _by_name(old or {})
    print(f"  {'calls/SMS':>10} {'own us/SMS':>10}  {'old calls':>10} {'old us':>8}  function")
    for name, values in sorted(new_n.items(), key=lambda item: -item[1][key])[:top]:
        before = old_n.get(name)
        old_cols = f"{before[1] / count:10.2f} {1e6 * before[2] / count:8.1f}" if before else f"{'-':>10} {'-':>8}"
        print(f"  {values[1] / count:10.2f} {1e6 * values[2] / count:10.1f}  {old_cols}  {name}")


def main(argv: list[str] | None = None) -> int:
    """Print the per-SMS profile of each worker kind; 1 when the directory holds no snapshots."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="the --profile DIR of a bench.run run")
    parser.add_argument("count", type=int, help="SMS of that run's throughput phase")
    parser.add_argument("--old", type=Path, help="the --profile DIR of a run of the older tree (same count)")
    parser.add_argument("--top", type=int, default=25, help="functions to list per worker kind (default 25)")
    parser.add_argument("--sort", choices=("tottime", "calls"), default="tottime", help="order of the list")
    args = parser.parse_args(argv)
    if not list(args.dir.glob("*.end.pstats")):
        print(f"no *.end.pstats in {args.dir}", file=sys.stderr)
        return 1
    for kind in ("modem_worker", "sync_worker"):
        old = phase(args.old, kind) if args.old else None
        show(kind, args.count, phase(args.dir, kind), old, args.top, args.sort)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
