"""Errors a user can fix: the CLI prints them as one line instead of a traceback."""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """A mistake in a config, flag or file that the user can correct; the message says how."""


class ProtocolError(Exception):
    """A message from the network that fails validation; the message is the logged reason and
    `code`, when given, the stable nack code (otherwise the receiver derives one)."""

    def __init__(self, reason: str, code: Optional[str] = None) -> None:
        super().__init__(reason)
        self.code = code
