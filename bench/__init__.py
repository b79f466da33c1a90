"""Benchmarks: each module has `run(quick: bool) -> dict` and prints JSON when run with -m."""
