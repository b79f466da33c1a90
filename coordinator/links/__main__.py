"""`python -m jetfed.coordinator.links CONFIG_JSON` runs the link relay (started by LinkedFleet)."""

from __future__ import annotations

from jetfed.coordinator.links.relay import main

main()
