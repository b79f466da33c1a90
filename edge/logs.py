"""Structured, quiet-by-default logging: one `event key=value ...` line per thing that happened."""

from __future__ import annotations

import logging
import sys
from typing import Any

_LEVELS = {0: logging.WARNING, 1: logging.INFO}


def configure_logging(verbosity: int = 0, stream: Any = None) -> None:
    """WARNING by default (rejections and faults), -v adds progress, -vv adds debug."""
    level = _LEVELS.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("transformers", "peft", "amqtt", "paho", "urllib3", "filelock", "asyncio"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if level > logging.DEBUG:
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)


def show_progress(*logger_names: str) -> None:
    """For commands whose progress is their output (a device serving rounds): these loggers
    log INFO even at the default verbosity."""
    for name in logger_names:
        named = logging.getLogger(name)
        if not named.isEnabledFor(logging.INFO):
            named.setLevel(logging.INFO)


def _fmt(value: Any) -> str:
    text = str(value)
    return repr(text) if (" " in text or not text) else text


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log `event k=v ...`; the event name is stable so logs can be grepped and parsed."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s %s", event, " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()))
