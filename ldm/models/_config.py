"""Shared rules for reading a diffusers ``config.json`` into our typed configs.

A diffusers config lists every constructor argument of its class. We model the
ones that SD checkpoints vary; every other key must hold its diffusers default
(a different value means a different architecture, which we refuse by name
rather than build something that silently does not match the weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm.errors import ConfigError


def check_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any], modeled: set[str], what: str) -> None:
    """Raise ``ConfigError`` for an unknown key or an unmodeled key that differs from its default."""
    for key, value in config.items():
        if key.startswith("_") or key in modeled:
            continue
        if key not in defaults:
            raise ConfigError(f"{what} config key {key!r} is unknown to ldm; remove it or use a supported model")
        if not _is_default(value, defaults[key]):
            raise ConfigError(
                f"{what} config key {key!r}={value!r} is not supported (ldm supports only {defaults[key]!r})"
            )


def _is_default(value: Any, default: Any) -> bool:
    # diffusers configs may spell a per-block default as a list, e.g. transformer_layers_per_block [1, 1, 1, 1].
    if isinstance(value, (list, tuple)) and not isinstance(default, (list, tuple)):
        return len(value) > 0 and all(_is_default(v, default) for v in value)
    return value == default


def as_int(config: Mapping[str, Any], key: str, what: str, default: int) -> int:
    """An int config value; a per-block list of equal ints counts as that int."""
    value = config.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"{what} config key {key!r}={list(value)!r} varies per block, which ldm does not support")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{what} config key {key!r}={value!r} must be an integer")
    return value


def as_int_tuple(config: Mapping[str, Any], key: str, what: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = config.get(key, default)
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{what} config key {key!r}={value!r} must be a list of integers")
    return tuple(value)


def check_range(what: str, key: str, value: Any, low: int, high: int) -> None:
    """Raise ``ConfigError`` unless ``value`` (an int, or a list of ints) lies in ``[low, high]``.

    The bounds keep a config from asking for more memory than any machine has (a width of 10^9,
    a 10^5-latent sample size): such a value is a broken file, reported by key before anything
    is allocated.
    """
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if not isinstance(item, int) or isinstance(item, bool):
            raise ConfigError(f"{what} config key {key!r}={value!r} must be an integer")
        if not low <= item <= high:
            raise ConfigError(f"{what} config key {key!r}={value!r} is out of range; ldm accepts {low} to {high}")
