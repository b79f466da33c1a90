"""Captured traffic of a real 2-device run, replayed and mutated by a third client (the short
profile of bench/hostile_replay.py; `python -m bench hostile_replay` runs the long one)."""

from __future__ import annotations

from pathlib import Path

from bench.hostile_replay import SHORT, run_hostile_replay
from tests.conftest import DATASETS


def test_replayed_and_mutated_traffic_breaks_no_invariant(
    tmp_path: Path, minilm_path: str, sst2_dir: Path
) -> None:
    outcome = run_hostile_replay(tmp_path, DATASETS, SHORT)
    assert outcome.rounds == SHORT.rounds
    assert not outcome.violations, outcome.violations
    for kind in ("duplicate", "bit_flip", "truncation", "cross_round_replay", "reordered"):
        assert outcome.sent.get(kind), (kind, outcome.sent)
    forged = ("forged", "forged_other", "forged_refused", "bad_index", "huge_number")
    for kind in (*forged, "never_said_hello"):
        assert outcome.sent.get(kind), (kind, outcome.sent)
    assert outcome.sent.get("forged_offline") == 1
