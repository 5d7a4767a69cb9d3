"""The router's limits and worker-fault options are one table each (``router/config.py``
``LIMIT_OPTIONS``, ``FAILOVER_OPTIONS``, ``ADMISSION_OPTIONS``; ``ROUTER_OPTIONS`` by section): the router's flags,
``splitserve up``'s, an InferenceService's ``spec.router.limits`` / ``.failover`` and the chart's
``routerLimits`` / ``routerFailover`` are derived from them or, for the chart's values, checked
against them here."""

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
from splitserve.router.config import (
    ADMISSION_OPTIONS,
    FAILOVER_OPTIONS,
    LIMIT_OPTIONS,
    ROUTER_OPTIONS,
    Limits,
    option_args,
    options_from_keys,
)

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
    assert list(crd.router_options_schema("limits")["properties"]) == keys
    chart = yaml.safe_load(VALUES.read_text())["routerLimits"]
    assert list(chart) == keys and set(chart.values()) == {None}  # null: the router's default


def test_every_place_names_the_same_failover_options() -> None:
    flags, keys = [o.flag for o in FAILOVER_OPTIONS], [o.key for o in FAILOVER_OPTIONS]
    assert flags == ["--poll-interval", "--poll-timeout", "--stream-stall-timeout", "--stream-idle-timeout",
                     "--max-attempts"]  # the router's flags as they were before the table
    assert keys[2] == "streamStallTimeoutSeconds" and keys[4] == "maxAttempts"
    assert _group_flags(_command(router_cli.register), "worker faults") == flags
    assert _group_flags(_command(up_cli.register), "router worker faults") == flags
    assert list(crd.router_options_schema("failover")["properties"]) == keys
    assert set(ROUTER_OPTIONS) <= set(crd.spec_schema()["properties"]["router"]["properties"])
    chart = yaml.safe_load(VALUES.read_text())["routerFailover"]
    assert list(chart) == keys and set(chart.values()) == {None}


def test_every_place_names_the_same_admission_options() -> None:
    flags, keys = [o.flag for o in ADMISSION_OPTIONS], [o.key for o in ADMISSION_OPTIONS]
    assert flags == ["--max-queue-ms", "--max-queued-requests"]  # --max-queue-ms as it was before
    assert keys == ["maxQueueMilliseconds", "maxQueuedRequests"]
    assert _group_flags(_command(router_cli.register), "admission") == flags
    assert _group_flags(_command(up_cli.register), "router admission") == flags
    schema = crd.router_options_schema("admission")["properties"]
    assert list(schema) == keys
    # 0 means "never wait" / "none wait": allowed, unlike the other sections' zero
    assert schema["maxQueueMilliseconds"]["minimum"] == 0 and "exclusiveMinimum" not in schema["maxQueueMilliseconds"]
    assert schema["maxQueuedRequests"]["minimum"] == 0
    chart = yaml.safe_load(VALUES.read_text())["routerAdmission"]
    assert list(chart) == keys and set(chart.values()) == {None}


def test_admission_options_take_zero_and_refuse_below_it() -> None:
    got = options_from_keys("admission", {"maxQueueMilliseconds": 0, "maxQueuedRequests": 0}, "X")
    assert got == {"max_queue_ms": 0, "max_queued_requests": 0}
    assert option_args({"max_queue_ms": 2500.0}) == ["--max-queue-ms", "2500.0"]
    with pytest.raises(ValueError, match=r"^X\.maxQueueMilliseconds must be a number of milliseconds >= 0"):
        options_from_keys("admission", {"maxQueueMilliseconds": -1}, "X")
    with pytest.raises(ValueError, match=r"^X\.maxQueuedRequests must be an integer >= 0"):
        options_from_keys("admission", {"maxQueuedRequests": -1}, "X")
    args = _command(router_cli.register).parse_args(["--model", "m", "--decode", "http://d:1", "--max-queue-ms", "0",
                                                     "--max-queued-requests", "7"])
    config = router_cli.config_from_args(args)
    assert config.max_queue_ms == 0 and config.max_queued_requests == 7


def test_the_chart_hands_every_section_to_the_operator() -> None:
    from splitserve.operator import settings

    template = (VALUES.parent / "templates" / "deployment.yaml").read_text()
    for section in ROUTER_OPTIONS:  # the variable settings.ROUTER_DEFAULTS reads, from the values
        assert f"name: SPLITSERVE_ROUTER_{section.upper()}\n" in template
        assert f".Values.router{section.capitalize()} | default dict | toJson" in template
    assert list(settings.ROUTER_DEFAULTS) == list(ROUTER_OPTIONS)


def test_failover_flags_written_for_the_router_are_what_it_reads() -> None:
    values = {"stream_stall_timeout_s": 0.5, "max_attempts": 3, "poll_timeout_s": 1}
    args = option_args(values)
    assert args == ["--poll-timeout", "1", "--stream-stall-timeout", "0.5", "--max-attempts", "3"]
    parsed = _command(router_cli.register).parse_args(["--model", "m", "--decode", "http://d", *args])
    config = router_cli.config_from_args(parsed)
    assert (config.poll_timeout_s, config.stream_stall_timeout_s, config.max_attempts) == (1.0, 0.5, 3)
    assert (config.poll_interval_s, config.stream_idle_timeout_s) == (0.5, 60.0)  # the defaults


def test_crd_schema_types_and_bounds_follow_the_limits() -> None:
    props = crd.router_options_schema("limits")["properties"]
    assert props["maxSequences"] | {"description": ""} == {
        "type": "integer", "format": "int64", "minimum": 1, "description": ""}
    assert props["keepAliveTimeoutSeconds"]["type"] == "number"
    assert props["keepAliveTimeoutSeconds"]["exclusiveMinimum"] is True
    assert "default, 4194304." in props["maxBodyBytes"]["description"]


def test_flags_written_for_the_router_are_what_it_reads() -> None:
    values = {"max_body_bytes": 1024, "header_timeout_s": 2.5, "max_connections": 7}
    args = option_args(values)
    assert args == ["--max-body-bytes", "1024", "--max-connections", "7", "--header-timeout", "2.5"]
    parsed = _command(router_cli.register).parse_args(["--model", "m", "--decode", "http://d", *args])
    assert router_cli.config_from_args(parsed).limits == Limits(**values)
    unset = _command(router_cli.register).parse_args(["--model", "m", "--decode", "http://d"])
    assert router_cli.config_from_args(unset).limits == Limits()


@pytest.mark.parametrize("value", [0, -1, True, "5", 1.5])
def test_a_bad_count_is_refused_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match="max_sequences must be an integer >= 1"):
        option_args({"max_sequences": value})
    with pytest.raises(ValueError, match=r"^spec\.router\.limits\.maxSequences must be"):
        options_from_keys("limits", {"maxSequences": value}, "spec.router.limits")
    with pytest.raises(ValueError, match=r"^spec\.router\.failover\.maxAttempts must be an integer >= 1"):
        options_from_keys("failover", {"maxAttempts": value}, "spec.router.failover")


@pytest.mark.parametrize("value", [0, -0.5, math.nan, math.inf, "1"])
def test_a_bad_timeout_is_refused_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match="body_timeout_s must be a number of seconds > 0"):
        Limits(body_timeout_s=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^X\.bodyTimeoutSeconds must be"):
        options_from_keys("limits", {"bodyTimeoutSeconds": value}, "X")
    with pytest.raises(ValueError, match="stream_stall_timeout_s must be a number of seconds > 0"):
        option_args({"stream_stall_timeout_s": value})
    with pytest.raises(ValueError, match=r"^X\.pollTimeoutSeconds must be"):
        options_from_keys("failover", {"pollTimeoutSeconds": value}, "X")


def test_an_unknown_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown router option max_bodies"):
        option_args({"max_bodies": 1})
    with pytest.raises(ValueError, match=r"spec\.router\.limits\.maxBody: unknown router limits field"):
        options_from_keys("limits", {"maxBody": 1}, "spec.router.limits")
    with pytest.raises(ValueError, match=r"spec\.router\.failover\.maxSequences: unknown router failover field"):
        options_from_keys("failover", {"maxSequences": 1}, "spec.router.failover")  # a limit, not here
    assert options_from_keys("limits", {"headerTimeoutSeconds": 3}, "X") == {"header_timeout_s": 3}
