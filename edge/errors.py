"""Errors a user can fix: the CLI prints them as one line instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in a config, flag or file that the user can correct; the message says how."""


class ProtocolError(Exception):
    """A message from the network that fails validation; the message is the logged reason."""
