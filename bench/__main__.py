"""`python -m bench NAME [--quick] [--out DIR] [--datasets DIR]`; NAME may be `all` (every bench
except the reproduction, which takes tens of minutes: `python -m bench reproduction [--quick]
[--link SPEC] [--rounds N] [--local-steps N] [--budget-min M]`) or `list`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

from bench.runner import (
    BENCHES,
    DEFAULT_DATASETS,
    DEFAULT_OUT,
    bench_available,
    known_benches,
    run_bench,
)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", help=f"one of: all, list, {', '.join(known_benches())}")
    parser.add_argument("--quick", action="store_true", help="small sizes (all in ≤ 10 min)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument(
        "--datasets", type=Path, default=DEFAULT_DATASETS, help="folder with sst2/, rte/, ..."
    )
    parser.add_argument("--link", default=None, help="emulated link spec (reproduction only)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds (reproduction, comparison)"
    )
    parser.add_argument(
        "--clients", type=int, default=None, help="edge processes (reproduction only)"
    )
    parser.add_argument("--clients-per-round", type=int, default=None, help="(reproduction only)")
    parser.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help="per device and round (reproduction, comparison)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="partition + training seed (reproduction only)"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated, e.g. federa,lora (reproduction, comparison)",
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated datasets, e.g. sst2 (reproduction only)"
    )
    parser.add_argument(
        "--resume-runs",
        action="store_true",
        help="continue runs an earlier invocation left, up to --rounds (reproduction only)",
    )
    parser.add_argument(
        "--budget-min",
        type=float,
        default=None,
        help="wall-clock cap in minutes, shared by the runs (reproduction only)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    if args.name == "list":
        for name in known_benches():
            print(name if bench_available(name) else f"{name} (not present)")
        return 0
    names = list(BENCHES) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in known_benches()]
    if unknown:
        parser.error(f"unknown bench {unknown[0]!r}; known: all, {', '.join(known_benches())}")
    options = {
        "datasets": args.datasets,
        "link": args.link,
        "out": args.out,
        "rounds": args.rounds,
        "budget_min": args.budget_min,
        "clients": args.clients,
        "clients_per_round": args.clients_per_round,
        "local_steps": args.local_steps,
        "seed": args.seed,
        "methods": args.methods.split(",") if args.methods else None,
        "only_datasets": args.only.split(",") if args.only else None,
        "resume_runs": args.resume_runs,
    }
    failed = []
    for name in names:
        if not bench_available(name):
            print(f"{name}: not present, skipped", file=sys.stderr)
            continue
        started = time.monotonic()
        print(f"{name}: running{' (quick)' if args.quick else ''}...", file=sys.stderr)
        try:
            run_bench(name, args.quick, args.out, options)
        except Exception as exc:  # one broken bench must not lose the others' results
            logging.exception("bench %s failed", name)
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        print(
            f"{name}: done in {time.monotonic() - started:.0f} s → {args.out / name}.md",
            file=sys.stderr,
        )
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
