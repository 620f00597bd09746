"""The one settings parser: every kind of value, and every error one line naming its variable."""

from __future__ import annotations

import re

import pytest

from microvm_blueprint.envparse import Env, check_int, parse_bool, parse_choice, parse_duration, parse_int
from microvm_blueprint.errors import ConfigError


@pytest.mark.parametrize(("raw", "value"), [
    ("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("On", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_booleans(raw: str, value: bool) -> None:
    assert parse_bool("X_FLAG", raw) is value


@pytest.mark.parametrize(("raw", "value", "lo", "hi"), [
    ("5", 5, None, None), (" 42 ", 42, 1, 100), ("-3", -3, -5, None), ("+7", 7, 0, 7), ("0", 0, 0, 0),
])
def test_integers(raw: str, value: int, lo: int | None, hi: int | None) -> None:
    assert parse_int("X_COUNT", raw, lo, hi) == value


@pytest.mark.parametrize(("raw", "value"), [("90", 90.0), ("0.25", 0.25), (" 1e1 ", 10.0), ("0", 0.0)])
def test_durations(raw: str, value: float) -> None:
    assert parse_duration("X_TIMEOUT_S", raw, 0, 3600) == value


def test_choices_keep_their_own_spelling() -> None:
    assert parse_choice("X_LEVEL", "debug", ("Error", "Debug")) == "Debug"
    assert parse_choice("X_MODE", " KVM ", ["auto", "kvm"]) == "kvm"


ERRORS: list[tuple[object, str]] = [
    (lambda: parse_bool("X_FLAG", "maybe"), "X_FLAG='maybe' is not a boolean (true/false)"),
    (lambda: parse_bool("X_FLAG", "2"), "X_FLAG='2' is not a boolean (true/false)"),
    (lambda: parse_int("X_COUNT", "many"), "X_COUNT='many' is not an integer"),
    (lambda: parse_int("X_COUNT", "1.5"), "X_COUNT='1.5' is not an integer"),
    (lambda: parse_int("X_COUNT", "1_000"), "X_COUNT='1_000' is not an integer"),
    (lambda: parse_int("X_COUNT", "٣"), "X_COUNT='٣' is not an integer"),
    (lambda: parse_int("X_COUNT", "0", 1), "X_COUNT='0' must be at least 1"),
    (lambda: parse_int("X_COUNT", "33", 1, 32), "X_COUNT='33' must be between 1 and 32"),
    (lambda: parse_int("X_COUNT", "9", None, 8), "X_COUNT='9' must be at most 8"),
    (lambda: check_int("X_COUNT", 0, 1), "X_COUNT=0 must be at least 1"),
    (lambda: parse_duration("X_TIMEOUT_S", "soon"), "X_TIMEOUT_S='soon' is not a number of seconds"),
    (lambda: parse_duration("X_TIMEOUT_S", "1_0"), "X_TIMEOUT_S='1_0' is not a number of seconds"),
    (lambda: parse_duration("X_TIMEOUT_S", "nan", 0, 60), "X_TIMEOUT_S='nan' must be between 0 and 60 seconds"),
    (lambda: parse_duration("X_TIMEOUT_S", "inf", 1), "X_TIMEOUT_S='inf' must be at least 1 seconds"),
    (lambda: parse_duration("X_TIMEOUT_S", "0.5", 1), "X_TIMEOUT_S='0.5' must be at least 1 seconds"),
    (lambda: parse_choice("X_MODE", "hvf", ["auto", "kvm"]), "X_MODE='hvf' is not one of: auto, kvm"),
    (lambda: Env({"P_N": "x"}, "P_").integer("N", 1), "P_N='x' is not an integer"),
    (lambda: Env({"P_B": "x"}, "P_").boolean("B", True), "P_B='x' is not a boolean (true/false)"),
    (lambda: Env({"P_D": "x"}, "P_").duration("D", 1.0), "P_D='x' is not a number of seconds"),
    (lambda: Env({"P_C": "x"}, "P_").choice("C", "a", ["a"]), "P_C='x' is not one of: a"),
    (lambda: Env({"P_O": "x"}, "P_").optional_integer("O"), "P_O='x' is not an integer"),
]


@pytest.mark.parametrize(("call", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_each_error_is_one_config_error_line_naming_the_variable(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$") as err:
        call()
    assert "\n" not in str(err.value)


def test_env_gives_defaults_for_unset_or_blank_and_strips() -> None:
    e = Env({"P_N": " 4 ", "P_BLANK": "  ", "P_T": " text ", "P_B": "off"}, "P_")
    assert e.integer("N", 1) == 4 and e.integer("BLANK", 7) == 7 and e.integer("MISSING", 9) == 9
    assert e.optional_integer("MISSING") is None and e.optional_integer("N", 1, 4) == 4
    assert e.text("T", "d") == "text" and e.text("BLANK", "d") == "d"
    assert e.boolean("B", True) is False and e.boolean("MISSING", True) is True
    assert e.duration("MISSING", 2.5) == 2.5 and e.choice("MISSING", "a", ["a", "b"]) == "a"
    assert e.raw("BLANK") is None and e.raw("T") == " text " and e.name("N") == "P_N"
