"""Accepted ranges of settings, as tables of name -> (test, accepted-range text).

TuneConfig.validate (edgezo/tune.py), make_optimizer (edgezo/optim/__init__.py) and profiles
(edgezo/profiles.py) each check their values against a table built from these pieces, so the CLI,
a profile and the Python API all stop a bad value before a run starts, with one line that names the
value and what is accepted. A new setting is one new line in its table.
"""

from __future__ import annotations

from typing import Any, Callable

from edgezo.errors import EdgezoError

Check = tuple[Callable[[Any], bool], str]
MIN_LENGTH = 8  # tokens per example: room for a prompt's end and a few scored tokens


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # (not NaN)


def at_least(low: int) -> Check:
    return (lambda v: _is_int(v) and v >= low), f"an integer ≥ {low}"


def above(low: float) -> Check:
    return (lambda v: _is_number(v) and v > low), f"a number > {low:g}"


def not_below(low: float) -> Check:
    return (lambda v: _is_number(v) and v >= low), f"a number ≥ {low:g}"


def fraction(*, low_open: bool = True, high_open: bool = True) -> Check:
    """A number in (0, 1), [0, 1), ... as the flags say."""
    def test(v) -> bool:
        return _is_number(v) and (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1)

    return test, f"a number in {'(' if low_open else '['}0, 1{')' if high_open else ']'}"


def one_of(values) -> Check:
    values = tuple(values)
    return (lambda v: isinstance(v, str) and v in values), "one of " + ", ".join(values)


def optional(check: Check, none: str = "none") -> Check:
    test, text = check
    return (lambda v: v is None or test(v)), f"{text}, or {none}"


def either(first: Check, second: Check) -> Check:
    return (lambda v: first[0](v) or second[0](v)), f"{first[1]}, or {second[1]}"


def literal(value: str) -> Check:
    return (lambda v: v == value), repr(value)


def pair_of(check: Check) -> Check:
    test, text = check
    return (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(map(test, v))), f"two of ({text})"


FLAG: Check = (lambda v: isinstance(v, bool)), "true or false"


def check(table: dict[str, Check], values: dict, where: str = "") -> None:
    """Raise one EdgezoError for the first value outside its accepted range (names not in `table` pass)."""
    for name, value in values.items():
        if name in table and not table[name][0](value):
            raise EdgezoError(f"{where}{name} must be {table[name][1]}, got {value!r}")
