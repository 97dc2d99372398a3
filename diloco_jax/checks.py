"""Argument checks for the public API: a bad value ends with one sentence naming the argument.

Python would take `True` for 1 and `2.0` for 2 in most places, or fail later with a bare
`TypeError` deep inside; these reject both up front. (Config files are checked by config.py,
which names the config key instead.)
"""

from __future__ import annotations

import numbers


def integer(name: str, value, minimum: int = 0) -> int:
  """`value` as an int if it is an integer (not a bool) >= minimum, else ValueError."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def real(name: str, value, lo: float, hi: float) -> float:
  """`value` as a float if it is a real number (not a bool) in [lo, hi], else ValueError."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not lo <= float(value) <= hi):
    raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
  return float(value)
