"""Parsing of settings (env vars, flags): one way per kind of value, for every layer.

Each parser takes the variable's name and its raw text and either returns the typed value or
raises :class:`~microvm_blueprint.errors.ConfigError` whose one line names the variable and the
text it was given (``NAME='raw' is not ...``). :class:`Env` looks names up in a mapping (with an
optional prefix) and gives the default for an unset or blank variable.

Accepted spellings:

* booleans: ``1 true yes on`` / ``0 false no off`` (any case);
* integers: ASCII decimal digits with an optional sign (no ``_``, no other scripts' digits);
* durations: a number of seconds (``0.25``, ``90``), finite;
* choices: one of a fixed list, matched without regard to case, returned as the list spells it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from .errors import ConfigError

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})
_INT = re.compile(r"[+-]?[0-9]+")

C = TypeVar("C", bound=str)


def parse_bool(name: str, raw: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off``, any case."""
    text = raw.strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (true/false)")


def check_int(name: str, value: int, lo: int | None = None, hi: int | None = None, *, shown: str | None = None) -> int:
    """``value`` if it lies in ``[lo, hi]`` (either bound may be open), else a :class:`ConfigError`."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            bound = f"between {lo} and {hi}"
        elif lo is not None:
            bound = f"at least {lo}"
        else:
            bound = f"at most {hi}"
        raise ConfigError(f"{name}={shown if shown is not None else repr(value)} must be {bound}")
    return value


def parse_int(name: str, raw: str, lo: int | None = None, hi: int | None = None) -> int:
    """A decimal integer within ``[lo, hi]``."""
    text = raw.strip()
    if not _INT.fullmatch(text):
        raise ConfigError(f"{name}={raw!r} is not an integer")
    return check_int(name, int(text), lo, hi, shown=repr(raw))


def parse_duration(name: str, raw: str, lo: float = 0.0, hi: float | None = None) -> float:
    """A finite number of seconds within ``[lo, hi]``."""
    text = raw.strip()
    try:
        if not text.isascii() or "_" in text:  # float() reads other scripts' digits and 1_0
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
        bound = f"between {lo:g} and {hi:g}" if hi is not None else f"at least {lo:g}"
        raise ConfigError(f"{name}={raw!r} must be {bound} seconds")
    return value


def parse_choice(name: str, raw: str, choices: Sequence[C]) -> C:
    """One of ``choices`` (compared without regard to case); returned as ``choices`` spells it."""
    text = raw.strip().lower()
    for choice in choices:
        if choice.lower() == text:
            return choice
    raise ConfigError(f"{name}={raw!r} is not one of: {', '.join(choices)}")


class Env:
    """Typed look-ups in an environment mapping; names are ``prefix + name``.

    An unset or blank (whitespace-only) variable gives the default; anything else must parse."""

    def __init__(self, env: Mapping[str, str], prefix: str = "") -> None:
        self.env = env
        self.prefix = prefix

    def name(self, name: str) -> str:
        """The full variable name (with the prefix)."""
        return self.prefix + name

    def raw(self, name: str) -> str | None:
        """The stripped text of the variable, ``None`` if unset or blank."""
        value = self.env.get(self.prefix + name)
        if value is None or not value.strip():
            return None
        return value

    def text(self, name: str, default: str) -> str:
        """The stripped text, or ``default``."""
        raw = self.raw(name)
        return raw.strip() if raw is not None else default

    def boolean(self, name: str, default: bool) -> bool:
        """See :func:`parse_bool`."""
        raw = self.raw(name)
        return default if raw is None else parse_bool(self.name(name), raw)

    def integer(self, name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        """See :func:`parse_int`."""
        raw = self.raw(name)
        return default if raw is None else parse_int(self.name(name), raw, lo, hi)

    def optional_integer(self, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
        """Like :meth:`integer`, with ``None`` for an unset variable."""
        raw = self.raw(name)
        return None if raw is None else parse_int(self.name(name), raw, lo, hi)

    def duration(self, name: str, default: float, lo: float = 0.0, hi: float | None = None) -> float:
        """See :func:`parse_duration`."""
        raw = self.raw(name)
        return default if raw is None else parse_duration(self.name(name), raw, lo, hi)

    def choice(self, name: str, default: C, choices: Sequence[C]) -> C:
        """See :func:`parse_choice`."""
        raw = self.raw(name)
        return default if raw is None else parse_choice(self.name(name), raw, choices)
