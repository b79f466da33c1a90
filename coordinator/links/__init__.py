"""Emulated device links for local fleets (`--link`): see docs/LINKS.md."""

from __future__ import annotations

from coordinator.links.fleet import LinkedFleet
from coordinator.links.netns import cleanup_stale
from coordinator.links.spec import LinkSpec

__all__ = ["LinkSpec", "LinkedFleet", "cleanup_stale"]
