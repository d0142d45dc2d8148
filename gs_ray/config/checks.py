"""Validation helpers of the config sections: each error names the `section.field` at fault."""

from __future__ import annotations

from gs_ray.core.errors import ConfigError


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    _check(value in choices, key, f"must be one of {', '.join(choices)}, got {value!r}")


def _check_fraction(value: float, key: str, *, allow_zero: bool = True) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    _check(low_ok and value < 1, key, f"must be in {'[0' if allow_zero else '(0'}, 1), got {value}")
