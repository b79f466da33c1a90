"""Config and flag mistakes: one clear line naming the field and the expected form, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jetfed.coordinator.config import causal_lm_config, load_config
from jetfed.edge.errors import UserError
from tests.conftest import REPO_ROOT
from tests.fleet import ENV

EXAMPLES_DIR = REPO_ROOT / "examples"

GOOD = {"name": "exp", "data": {"path": "data"}}


def write(tmp_path: Path, raw: object) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"rounds": {"min_clients": 0}},
            "rounds.min_clients: Input should be greater than or equal to 1",
        ),
        ({"rounds": {"mins_clients": 2}}, "rounds.mins_clients: unknown field"),
        (
            {"training": {"learning_rate": "fast"}},
            "training.learning_rate: Input should be a valid number",
        ),
        (
            {"method": {"name": "lora", "rank": 0}},
            "method.rank: Input should be greater than or equal to 1",
        ),
        ({"method": {"name": "lora", "ranc": 8}}, "method.ranc: unknown field"),
        ({"method": {"name": "nope"}}, "unknown method 'nope'"),
        ({"name": "has space"}, "name: String should match pattern"),
        (
            {"data": {"partition": {"kind": "random"}}},
            "data.partition.kind: String should match pattern",
        ),
        ({"transfer": {"update_dtype": "fp8"}}, "transfer.update_dtype"),
        (
            {"rounds": {"min_clients": 3, "clients_per_round": 2}},
            "clients_per_round must be >= rounds.min_clients",
        ),
    ],
)
def test_config_mistakes_name_the_field(tmp_path: Path, change: dict, expected: str) -> None:
    raw = {**GOOD, **change}
    if "data" in change:
        raw["data"] = {"path": "data", **change["data"]}
    with pytest.raises(UserError) as error:
        load_config(write(tmp_path, raw))
    message = str(error.value)
    assert expected in message and "\n" not in message


def test_overrides_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    config = load_config(path, ["rounds.count=7", "method.rank=4", "training.learning_rate=5e-4"])
    assert config.rounds.count == 7 and config.method.settings() == {"rank": 4}
    assert config.training.learning_rate == 5e-4
    with pytest.raises(UserError, match=r"section\.key=value"):
        load_config(path, ["rounds.count"])
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jetfed", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


def test_cli_prints_one_line_errors_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, {**GOOD, "rounds": {"count": -1}})
    result = run_cli("coordinator", "run", path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"jetfed: error: {path}: rounds.count: Input should be greater than or equal to 1 (got -1)"
    ]
    result = run_cli("edge", "run", "--broker", "http://x", "--device-id", "d", "--data", ".")
    assert result.returncode == 2 and "mqtt://HOST:1883" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("edge", "run", "--broker", "mqtt://h", "--device-id", "bad/id", "--data", ".")
    assert (
        result.returncode == 2 and "device-id" in result.stderr and "Traceback" not in result.stderr
    )


def test_partition_command_prints_class_counts(sst2_dir: Path) -> None:
    result = run_cli(
        "partition",
        "--data",
        str(sst2_dir),
        "--split",
        "validation",
        "--kind",
        "dirichlet",
        "--clients",
        "3",
        "--alpha",
        "0.5",
    )
    assert result.returncode == 0, result.stderr
    assert "dirichlet partition" in result.stdout and "class 1" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith("│ ")]
    assert sum(int(row.split("│")[2]) for row in rows) == 872


def test_the_one_line_form_of_a_pydantic_error() -> None:
    """Every config, flag, method, strategy and message error goes through one helper."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    from jetfed.edge.errors import flag_error, validation_line

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        rate_hz: float = Field(gt=0)

    def first(**fields: object) -> ValidationError:
        with pytest.raises(ValidationError) as caught:
            Settings(**fields)  # type: ignore[arg-type]
        return caught.value

    assert validation_line(first(rate_hz=-1), root="telemetry") == (
        "telemetry.rate_hz: Input should be greater than 0 (got -1)"
    )
    assert validation_line(first(rate_hz=1, rte=2)) == "rte: unknown field (check the spelling)"
    assert validation_line(first(), default="settings") == "rate_hz: Field required"
    assert str(flag_error(first(rate_hz=0))) == "--rate-hz: Input should be greater than 0 (got 0)"


@pytest.mark.parametrize("example", sorted(path.name for path in EXAMPLES_DIR.glob("*.yaml")))
def test_every_example_config_validates(example: str) -> None:
    """The example experiments are what the docs' commands run: they must not rot."""
    config = load_config(str(EXAMPLES_DIR / example))
    causal = causal_lm_config(config)  # a classifier option on a causal LM raises its one line
    assert causal == (example == "aggregation-smollm2.yaml")
