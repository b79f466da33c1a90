"""Errors a user can fix: the CLI prints them as one line instead of a traceback."""

from __future__ import annotations

from typing import Any, Optional


class UserError(Exception):
    """A mistake in a config, flag or file that the user can correct; the message says how."""


def flag_error(exc: Any) -> UserError:
    """A pydantic ValidationError from CLI flags as one line naming the flag (`--rate-hz`)."""
    first = exc.errors()[0]
    flag = str(first["loc"][0]).replace("_", "-") if first["loc"] else "flags"
    return UserError(f"--{flag}: {first['msg']}")


def one_line(exc: BaseException) -> str:
    """The first line of a library exception's message (further lines are advice)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class ProtocolError(Exception):
    """A message from the network that fails validation; the message is the logged reason and
    `code`, when given, the stable nack code (otherwise the receiver derives one)."""

    def __init__(self, reason: str, code: Optional[str] = None) -> None:
        super().__init__(reason)
        self.code = code
