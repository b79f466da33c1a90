"""Emulated device links for local fleets (`--link`): see docs/LINKS.md."""

from __future__ import annotations

from jetfed.coordinator.links.fleet import LinkedFleet
from jetfed.coordinator.links.netns import cleanup_stale
from jetfed.coordinator.links.spec import LinkSpec

__all__ = ["LinkSpec", "LinkedFleet", "cleanup_stale"]
