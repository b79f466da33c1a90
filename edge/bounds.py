"""Physically sensible ranges for every number that crosses the network.

A number a device (or anyone on the broker) sends ends up in arithmetic, metrics and the
profiles tables: an unbounded int (2**70 bytes) overflows int64 columns, NaN poisons sums. Each
type below says what a real Jetson run can produce, with generous headroom, and the schema
refuses the rest at the boundary.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

MAX_BYTES = 1 << 50
"""1 PiB: more than any device's memory, traffic or file in a run (and exact in float64)."""
MAX_COUNT = 1 << 40
"""Samples, steps, chunk indices, power samples."""
MAX_ROUND_INDEX = 1_000_000
MAX_SECONDS = 1e9
"""A duration (about 31 years) or a unix time offset."""
MAX_UNIX_S = 1e10
"""Unix time until the year 2286."""
MAX_POWER_W = 1e5
"""100 kW: far above any device a model is fine-tuned on."""
MAX_ENERGY_J = 1e12
MAX_METRIC = 1e15
"""Free-form metric values (losses, accuracies, counters a method reports)."""
MAX_RATE_HZ = 1e6
MAX_MAP_ENTRIES = 256
"""Named values per map (rails, extra counters, metrics)."""

Bytes = Annotated[int, Field(ge=0, le=MAX_BYTES)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
RoundIndex = Annotated[int, Field(ge=0, le=MAX_ROUND_INDEX)]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
UnixSeconds = Annotated[float, Field(ge=0, le=MAX_UNIX_S, allow_inf_nan=False)]
Offset_s = Annotated[float, Field(ge=-MAX_SECONDS, le=MAX_SECONDS, allow_inf_nan=False)]
"""Signed seconds relative to another time (a sample just before a phase started)."""
Watts = Annotated[float, Field(ge=-MAX_POWER_W, le=MAX_POWER_W, allow_inf_nan=False)]
"""Signed: a current sensor reads slightly negative near zero."""
Joules = Annotated[float, Field(ge=-MAX_ENERGY_J, le=MAX_ENERGY_J, allow_inf_nan=False)]
"""Signed: energy above the idle baseline is negative when a phase drew less than idle."""
Metric = Annotated[float, Field(ge=-MAX_METRIC, le=MAX_METRIC, allow_inf_nan=False)]
Hertz = Annotated[float, Field(ge=0, le=MAX_RATE_HZ, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=128)]
"""A key in a map of named values (a rail, a metric)."""
