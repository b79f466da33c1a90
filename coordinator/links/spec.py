"""The `--link` grammar: what one emulated device link does to traffic (rate, delay, jitter, loss).

Kept free of anything root- or Linux-specific so configs and profiles can parse and record a link
on any machine.
"""

from __future__ import annotations

import re
from typing import Dict, NoReturn, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jetfed.edge.errors import UserError, validation_line

EXPECTED_FORM = (
    "expected RATE,DELAY,LOSS such as '100mbit,20ms,0.1%' (jitter as '20ms±5ms'; "
    "keys rate=, up=, down=, delay=, jitter=, loss=; rates in bit/kbit/mbit/gbit, times in us/ms/s)"
)

_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_RATE_RE = re.compile(_NUMBER + r"(bit|kbit|mbit|gbit)(?:/s)?", re.IGNORECASE)
_TIME_RE = re.compile(_NUMBER + r"(us|ms|s)", re.IGNORECASE)
_LOSS_RE = re.compile(_NUMBER + r"%")
_JITTER_SEPARATORS = ("±", "+-")


class LinkSpec(BaseModel):
    """One device's link. `delay_s` is the round trip the link adds (half in each direction), as
    `ping` would show it; `jitter_s` spreads the round trip by up to ± that much. Rates count IP
    bytes; `None` means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    up_rate_bit_s: Optional[float] = Field(default=None, gt=0)
    down_rate_bit_s: Optional[float] = Field(default=None, gt=0)
    delay_s: float = Field(default=0.0, ge=0)
    jitter_s: float = Field(default=0.0, ge=0)
    loss_pct: float = Field(default=0.0, ge=0, lt=100)

    @model_validator(mode="after")
    def _jitter_within_delay(self) -> LinkSpec:
        if self.jitter_s > self.delay_s:
            raise ValueError("jitter must not exceed the delay")
        return self

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """Parse `100mbit,20ms,0.1%`, `100mbit,20ms±5ms`, `up=10mbit,down=100mbit,delay=20ms`..."""
        fields: Dict[str, float] = {}
        items = [item.strip() for item in text.split(",")]
        if not text.strip() or not all(items):
            _fail(text, "empty item")
        for item in items:
            key, value = _split_item(text, item)
            for name, number in _item_fields(text, key, value):
                if name in fields:
                    _fail(text, f"{key} given twice")
                fields[name] = number
        try:
            return cls(**fields)
        except ValidationError as exc:
            _fail(text, validation_line(exc, default="link"))

    def to_dict(self) -> Dict[str, object]:
        """What a profile records: the canonical spec string plus every number with its unit."""
        record: Dict[str, object] = {"spec": str(self)}
        record.update(self.model_dump())
        return record

    def __str__(self) -> str:
        parts = []
        if self.up_rate_bit_s == self.down_rate_bit_s:
            if self.up_rate_bit_s is not None:
                parts.append(_format_rate(self.up_rate_bit_s))
        else:
            for name, rate in (("up", self.up_rate_bit_s), ("down", self.down_rate_bit_s)):
                if rate is not None:
                    parts.append(f"{name}={_format_rate(rate)}")
        if self.delay_s:
            delay = _format_time(self.delay_s)
            parts.append(f"{delay}±{_format_time(self.jitter_s)}" if self.jitter_s else delay)
        if self.loss_pct:
            parts.append(f"{self.loss_pct:g}%")
        return ",".join(parts) or "unlimited"


def _fail(text: str, reason: str) -> NoReturn:
    raise UserError(f"--link {text!r}: {reason}; {EXPECTED_FORM}")


def _split_item(text: str, item: str) -> Tuple[str, str]:
    """`key=value` or a bare value whose unit says what it is."""
    if "=" in item:
        key, value = item.split("=", 1)
        return key.strip().lower(), value.strip()
    if _RATE_RE.fullmatch(item):
        return "rate", item
    if _LOSS_RE.fullmatch(item):
        return "loss", item
    if _TIME_RE.fullmatch(item) or any(sep in item for sep in _JITTER_SEPARATORS):
        return "delay", item
    _fail(text, f"cannot tell what {item!r} is")


def _item_fields(text: str, key: str, value: str) -> Tuple[Tuple[str, float], ...]:
    if key == "rate":
        rate = _parse_rate(text, value)
        return (("up_rate_bit_s", rate), ("down_rate_bit_s", rate))
    if key in ("up", "down"):
        return ((f"{key}_rate_bit_s", _parse_rate(text, value)),)
    if key == "delay":
        for sep in _JITTER_SEPARATORS:
            if sep in value:
                delay, jitter = value.split(sep, 1)
                return (
                    ("delay_s", _parse_time(text, delay.strip())),
                    ("jitter_s", _parse_time(text, jitter.strip())),
                )
        return (("delay_s", _parse_time(text, value)),)
    if key == "jitter":
        return (("jitter_s", _parse_time(text, value)),)
    if key == "loss":
        match = _LOSS_RE.fullmatch(value)
        if not match:
            _fail(text, f"loss {value!r} is not a percentage like 0.1%")
        return (("loss_pct", float(match.group(1))),)
    _fail(text, f"unknown key {key!r}")


def _parse_rate(text: str, value: str) -> float:
    match = _RATE_RE.fullmatch(value)
    if not match:
        _fail(text, f"rate {value!r} is not like 100mbit")
    return float(match.group(1)) * _RATE_UNITS[match.group(2).lower()]


def _parse_time(text: str, value: str) -> float:
    match = _TIME_RE.fullmatch(value)
    if not match:
        _fail(text, f"time {value!r} is not like 20ms")
    return float(match.group(1)) * _TIME_UNITS[match.group(2).lower()]


def _format_rate(rate_bit_s: float) -> str:
    for unit in ("gbit", "mbit", "kbit"):
        if rate_bit_s >= _RATE_UNITS[unit]:
            return f"{rate_bit_s / _RATE_UNITS[unit]:g}{unit}"
    return f"{rate_bit_s:g}bit"


def _format_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:g}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:g}ms"
    return f"{seconds * 1e6:g}us"
