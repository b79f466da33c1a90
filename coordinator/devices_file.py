"""devices.yaml: the MQTT accounts `jetfed broker-config` writes (device ids, optional
passwords, the experiments the ACL allows, the coordinator's account), checked with one-line
errors before anything is generated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jetfed.edge.errors import UserError, validation_line

MQTT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
PASSWORD = re.compile(r"^[A-Za-z0-9_.~+=@%:,!-]{12,128}$")
PASSWORD_RULE = "12 to 128 characters from A-Z a-z 0-9 _ . ~ + = @ % : , ! -"


def _check_mqtt_name(value: str, what: str) -> str:
    """Names become topic levels, ACL users and folder names: no wildcards, '/', or leading dot."""
    if not MQTT_NAME.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must be 1-64 characters from A-Z a-z 0-9 _ . - "
            "and must not start with '.' or '-'"
        )
    return value


def _check_password(value: Optional[str]) -> Optional[str]:
    if value is not None and not PASSWORD.fullmatch(value):
        raise ValueError(f"password must be {PASSWORD_RULE}")
    return value


class DeviceEntry(BaseModel):
    """One device account; without a password one is generated and kept across re-runs."""

    model_config = ConfigDict(extra="forbid")
    id: str
    password: Optional[str] = None

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _check_mqtt_name(value, "device id")

    @field_validator("password")
    @classmethod
    def _password(cls, value: Optional[str]) -> Optional[str]:
        return _check_password(value)


class CoordinatorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = "coordinator"
    password: Optional[str] = None

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        return _check_mqtt_name(value, "coordinator username")

    @field_validator("password")
    @classmethod
    def _password(cls, value: Optional[str]) -> Optional[str]:
        return _check_password(value)


class DevicesFile(BaseModel):
    """devices.yaml: `devices` (ids or {id, password}), optional `experiments` and `coordinator`.

    Listing experiments narrows the ACL to those names; without them any experiment works.
    """

    model_config = ConfigDict(extra="forbid")
    devices: List[DeviceEntry] = Field(min_length=1)
    experiments: List[str] = Field(default_factory=list)
    coordinator: CoordinatorEntry = Field(default_factory=CoordinatorEntry)

    @field_validator("devices", mode="before")
    @classmethod
    def _bare_ids(cls, values: object) -> object:
        if isinstance(values, list):
            return [{"id": v} if isinstance(v, str) else v for v in values]
        return values

    @field_validator("experiments")
    @classmethod
    def _experiments(cls, values: List[str]) -> List[str]:
        return [_check_mqtt_name(v, "experiment") for v in values]


def parse_devices(data: object, source: str = "devices.yaml") -> DevicesFile:
    """A bare list of ids is shorthand for `devices:`; duplicates and reserved names fail."""
    if isinstance(data, list):
        data = {"devices": data}
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a list of device ids or a mapping with a 'devices' list")
    try:
        spec = DevicesFile.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{source}: {validation_line(exc, default='top level')}") from None
    seen = set()
    for entry in spec.devices:
        if entry.id in seen:
            raise UserError(f"{source}: device id {entry.id!r} is listed twice")
        if entry.id == spec.coordinator.username:
            raise UserError(
                f"{source}: device id {entry.id!r} is the coordinator's username; rename the device"
            )
        seen.add(entry.id)
    return spec


def load_devices(path: Path) -> DevicesFile:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"--devices: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(
            f"--devices: {path} is not valid YAML: {str(exc).splitlines()[0]}"
        ) from None
    return parse_devices(data, str(path))
