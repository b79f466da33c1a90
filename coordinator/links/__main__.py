"""`python -m coordinator.links CONFIG_JSON` runs the link relay (started by LinkedFleet)."""

from __future__ import annotations

from coordinator.links.relay import main

main()
