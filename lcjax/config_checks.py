"""Validators for the config dataclasses: each error names the key, the bad value and what was expected."""

from __future__ import annotations

import math


def check(cond: bool, key: str, value, expected: str) -> None:
    """Raise a ValueError naming the key, the bad value and what was expected."""
    if not cond:
        raise ValueError(f"config: {key}={value!r} is invalid: expected {expected}")


def finite(value) -> bool:
    """A real number that is neither NaN nor infinite (bools and strings are not numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(key: str, value, choices) -> None:
    """Raise unless `value` is one of `choices`."""
    check(value in choices, key, value, f"one of {list(choices)}")


def check_positive(obj, *keys: str) -> None:
    """Raise unless each named attribute of `obj` is a positive integer."""
    for key in keys:
        value = getattr(obj, key)
        check(isinstance(value, int) and value > 0, key, value, "a positive integer")
