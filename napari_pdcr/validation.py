"""Checks of parameters where they enter, in the user's words.

Each function returns the value normalised (``int``, ``float``, a tuple) or raises one
sentence naming the parameter, the value and what is allowed: ``ValueError`` for a
number of the wrong kind or size, ``TypeError`` for something that is not a number.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np


def shown(value) -> str:
    """How ``value`` appears in a message: ``2.5``, ``nan``, ``True``, ``'3'``, ``(4, 4)``."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Number):
        return str(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _reject(name: str, allowed: str, value):
    error = ValueError if isinstance(value, (numbers.Number, np.bool_)) else TypeError
    raise error(f"{name} must be {allowed}; got {shown(value)}")


def _integer(name: str, value, minimum: int, allowed: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < minimum:
        _reject(name, allowed, value)
    return int(value)


def positive_int(name: str, value) -> int:
    """``value`` as an ``int`` >= 1 (numpy integers too; not bools, not ``3.0``)."""
    return _integer(name, value, 1, "a positive integer")


def non_negative_int(name: str, value) -> int:
    """``value`` as an ``int`` >= 0 (numpy integers too; not bools, not ``3.0``)."""
    return _integer(name, value, 0, "a non-negative integer")


def optional_positive_int(name: str, value) -> int | None:
    """``None``, or ``value`` as an ``int`` >= 1."""
    return None if value is None else positive_int(name, value)


def positive_float(name: str, value) -> float:
    """``value`` as a finite ``float`` > 0."""
    return finite_float(name, value, minimum=0, strict=True)


def finite_float(name: str, value, minimum: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite ``float``, at least ``minimum`` (above it when ``strict``)."""
    allowed = "a finite number" if minimum is None else f"a finite number {'>' if strict else '>='} {minimum:g}"
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        _reject(name, allowed, value)
    number = float(value)
    if not math.isfinite(number) or minimum is not None and (number <= minimum if strict else number < minimum):
        _reject(name, allowed, value)
    return number


def value_range(name: str, value) -> tuple[float, float]:
    """``value`` as ``(low, high)``: two finite numbers with ``low < high``."""
    message = f"{name} must be two finite numbers (low, high) with low < high; got {shown(value)}"
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)) or len(value) != 2:
        raise TypeError(message)
    try:
        low, high = (finite_float(name, v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not low < high:
        raise ValueError(message)
    return low, high


def first_line(error: BaseException) -> str:
    """An error's message as one line (its class name when it has none)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
