"""The router's limits are one table (``router/config.py`` ``LIMIT_OPTIONS``): the router's
flags, ``splitserve up``'s, an InferenceService's ``spec.router.limits`` and the chart's
``routerLimits`` are derived from it or, for the chart's values, checked against it here."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from splitserve.launcher import cli as up_cli
from splitserve.operator import crd
from splitserve.router import cli as router_cli
from splitserve.router.config import LIMIT_OPTIONS, Limits, limit_args, limits_from_keys

VALUES = Path(__file__).resolve().parent.parent / "charts" / "splitserve" / "values.yaml"


def _command(register) -> argparse.ArgumentParser:  # noqa: ANN001 (a module's register)
    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    return next(iter(sub.choices.values()))


def _group_flags(parser: argparse.ArgumentParser, title: str) -> list[str]:
    group = next(g for g in parser._action_groups if g.title == title)
    return [a.option_strings[0] for a in group._group_actions]


def test_every_place_names_the_same_limits() -> None:
    assert [o.field for o in LIMIT_OPTIONS] == [f.name for f in dataclasses.fields(Limits)]
    flags, keys = [o.flag for o in LIMIT_OPTIONS], [o.key for o in LIMIT_OPTIONS]
    assert flags[0] == "--max-body-bytes" and flags[4] == "--header-timeout"
    assert keys[0] == "maxBodyBytes" and keys[4] == "headerTimeoutSeconds"
    assert _group_flags(_command(router_cli.register), "limits") == flags
    assert _group_flags(_command(up_cli.register), "router limits") == flags
    assert list(crd.router_limits_schema()["properties"]) == keys
    chart = yaml.safe_load(VALUES.read_text())["routerLimits"]
    assert list(chart) == keys and set(chart.values()) == {None}  # null: the router's default


def test_crd_schema_types_and_bounds_follow_the_limits() -> None:
    props = crd.router_limits_schema()["properties"]
    assert props["maxSequences"] | {"description": ""} == {
        "type": "integer", "format": "int64", "minimum": 1, "description": ""}
    assert props["keepAliveTimeoutSeconds"]["type"] == "number"
    assert props["keepAliveTimeoutSeconds"]["exclusiveMinimum"] is True
    assert "default, 4194304." in props["maxBodyBytes"]["description"]


def test_flags_written_for_the_router_are_what_it_reads() -> None:
    values = {"max_body_bytes": 1024, "header_timeout_s": 2.5, "max_connections": 7}
    args = limit_args(values)
    assert args == ["--max-body-bytes", "1024", "--max-connections", "7", "--header-timeout", "2.5"]
    parsed = _command(router_cli.register).parse_args(["--model", "m", "--decode", "http://d", *args])
    assert router_cli.config_from_args(parsed).limits == Limits(**values)
    unset = _command(router_cli.register).parse_args(["--model", "m", "--decode", "http://d"])
    assert router_cli.config_from_args(unset).limits == Limits()


@pytest.mark.parametrize("value", [0, -1, True, "5", 1.5])
def test_a_bad_count_is_refused_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match="max_sequences must be an integer >= 1"):
        limit_args({"max_sequences": value})
    with pytest.raises(ValueError, match=r"^spec\.router\.limits\.maxSequences must be"):
        limits_from_keys({"maxSequences": value}, "spec.router.limits")


@pytest.mark.parametrize("value", [0, -0.5, math.nan, math.inf, "1"])
def test_a_bad_timeout_is_refused_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match="body_timeout_s must be a number of seconds > 0"):
        Limits(body_timeout_s=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^X\.bodyTimeoutSeconds must be"):
        limits_from_keys({"bodyTimeoutSeconds": value}, "X")


def test_an_unknown_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown router limit max_bodies"):
        limit_args({"max_bodies": 1})
    with pytest.raises(ValueError, match=r"spec\.router\.limits\.maxBody: unknown router limit"):
        limits_from_keys({"maxBody": 1}, "spec.router.limits")
    assert limits_from_keys({"headerTimeoutSeconds": 3}, "X") == {"header_timeout_s": 3}
