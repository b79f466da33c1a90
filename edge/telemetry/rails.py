"""Which rails make up "module power": the rule differs per Jetson and must never double count."""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Tuple

# AGX Orin: VDDQ_VDD2_1V8AO is measured inside VIN_SYS_5V0, so it is kept as a rail but not summed.
AGX_ORIN_MODULE_RAILS = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")
# Rails that already measure the whole module input (Orin NX/Nano, Xavier NX, Nano, Thor carrier).
TOTAL_INPUT_RAILS = ("VIN", "VDD_IN", "POM_5V_IN")


def module_rail_names(rails: Iterable[str]) -> Tuple[str, ...]:
    """The rails summed into module power: a total-input rail alone when present; on AGX Orin
    GPU_SOC + CPU_CV + SYS_5V0; otherwise (older Jetsons, other backends) every rail."""
    names = set(rails)
    for name in TOTAL_INPUT_RAILS:
        if name in names:
            return (name,)
    if names & set(AGX_ORIN_MODULE_RAILS):
        return AGX_ORIN_MODULE_RAILS
    return tuple(sorted(names))


def module_power_w(rails_w: Mapping[str, Optional[float]]) -> Optional[float]:
    """Module power in W; None when a rail it needs is missing (never a partial sum)."""
    names = module_rail_names(rails_w)
    values = [rails_w.get(name) for name in names]
    if not values or any(value is None for value in values):
        return None
    return float(sum(value for value in values if value is not None))
