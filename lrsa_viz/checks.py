"""Argument checks shared by the library: one message format for every bad integer."""
from __future__ import annotations

import dataclasses


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) in [low, high] (``high=None``: no upper bound), else a ValueError
    naming ``name`` and the accepted range."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        accepted = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {accepted}, got {value!r}")
    return value


def check_fields(cls, d: dict, what: str) -> None:
    """ValueError naming the keys of ``d`` that are not fields of the dataclass ``cls`` (``what``: its name in the
    message), e.g. a config file written by another version."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"unknown {what} field(s) {sorted(unknown)}; accepted: {sorted(fields)}")
