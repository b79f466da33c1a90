"""Errors a user can fix: the CLI prints them as one line instead of a traceback."""

from __future__ import annotations

import reprlib
from typing import Any, List, Optional, Tuple


class UserError(Exception):
    """A mistake in a config, flag or file that the user can correct; the message says how."""


def _first_error(exc: Any) -> Tuple[List[str], str]:
    """(location parts, message) of a pydantic ValidationError's first error."""
    error = exc.errors()[0]
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = "unknown field (check the spelling)"
    elif "input" in error and not isinstance(error["input"], (dict, list)):
        message = f"{message} (got {reprlib.repr(error['input'])})"
    return [str(part) for part in error.get("loc", ())], message


def validation_line(exc: Any, root: str = "", default: str = "input") -> str:
    """A pydantic ValidationError as one line, `root.field: message`: the first error only, so
    a user fixes one thing at a time (`default` names the place when the error has none)."""
    loc, message = _first_error(exc)
    where = ".".join(part for part in (root, *loc) if part) or default
    return f"{where}: {message}"


def flag_error(exc: Any) -> UserError:
    """A pydantic ValidationError from CLI flags as one line naming the flag (`--rate-hz`)."""
    loc, message = _first_error(exc)
    flag = loc[0].replace("_", "-") if loc else "flags"
    return UserError(f"--{flag}: {message}")


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
