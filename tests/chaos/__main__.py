"""Run the chaos suite by hand: ``python -m tests.chaos [--long] [--seed N] [--minutes M] [--workdir DIR]``.

Needs RabbitMQ on 127.0.0.1:5672 (guest, ``rabbitmqctl`` on the PATH) and PostgreSQL on 127.0.0.1:5432 (database
``test``; ``SMSGW_TEST_PG_URL`` overrides). It makes a vhost and a schema of its own and removes both afterwards;
the services themselves are never stopped (outages are a cut TCP proxy). Prints the seed first and the table last;
exits 1 when anything was lost, altered, doubled, parked or left unreported.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from scripts.stack import delete_vhost, ensure_vhost
from tests.chaos.harness import run_plan
from tests.chaos.scenarios import SHORT_SEED, long_plan, short_plan

PG_URL = os.environ.get("SMSGW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="the long form (default: the short form of the tests)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random for --long, else the tests')")
    parser.add_argument("--minutes", type=float, default=10.0, help="long form: about this many minutes of faults")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temporary directory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else (random.randrange(1, 10**6) if args.long else SHORT_SEED)
    plan = long_plan(seed, args.minutes) if args.long else short_plan(seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="smsgw-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    vhost, schema = f"smsgw-chaos-{uuid.uuid4().hex[:8]}", f"smsgw_chaos_{uuid.uuid4().hex[:8]}"
    amqp_url = ensure_vhost(vhost)
    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    ledger_url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    started = time.monotonic()
    try:
        result = run_plan(plan, workdir, amqp_url, ledger_url, vhost, lambda line: print(line, flush=True))
    finally:
        delete_vhost(vhost)
        with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    print(f"{time.monotonic() - started:.0f} s; logs in {workdir / 'logs'}; repeat with --seed {seed}")
    if not result.settled or result.bad or result.exits:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
