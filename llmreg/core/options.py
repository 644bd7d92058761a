"""Typed option dataclasses from plain dicts, with errors a user can act on.

One mechanism serves regularizer options, recipe sections and the trainer
config classes of transformers / TRL: unknown keys get the closest valid key,
values are checked (and, for strings coming from the command line, coerced)
against the field's annotation.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
import warnings
from typing import Any, Union


class ConfigError(ValueError):
    """A bad recipe or option value. The message is one line, meant for users."""


class ConfigWarning(UserWarning):
    """A legal but probably mistaken value (lam=1e30); the CLI prints it as one line `warning: ...`."""


BOUND_KEYS = ("ge", "gt", "le", "lt")
_BOUND_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b)}
_BOUND_OPS.update({"le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)})


def range_text(bounds: dict[str, Any]) -> str:
    """'>= 0', 'in [0, 1]', 'in (0, 1)', ... for the `ge`/`gt`/`le`/`lt` entries of `bounds` ('' for none)."""
    low = next(((k, bounds[k]) for k in ("ge", "gt") if bounds.get(k) is not None), None)
    high = next(((k, bounds[k]) for k in ("le", "lt") if bounds.get(k) is not None), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]:g}, {high[1]:g}{']' if high[0] == 'le' else ')'}"
    one = low or high
    return f"{_BOUND_OPS[one[0]][0]} {one[1]:g}" if one else ""


def check_range(value: Any, bounds: dict[str, Any], key: str, where: str, warn: bool = True) -> None:
    """Raise a ConfigError naming `key` when a number (or an item of a list) of `value` is out of `bounds`;
    warn (ConfigWarning) when it is above `bounds["warn_above"]`. None and non-numbers pass."""
    items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if any(bounds.get(k) is not None and not _BOUND_OPS[k][1](item, bounds[k]) for k in BOUND_KEYS):
            raise ConfigError(f"{where}: {key} must be {range_text(bounds)}, got {item!r}")
        if warn and bounds.get("warn_above") is not None and item > bounds["warn_above"]:
            warnings.warn(
                f"{where}: {key}={item!r} is beyond {bounds['warn_above']:g}; is that meant?", ConfigWarning, 2
            )


def closest(name: str, valid: typing.Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    """`; did you mean '<prefix><closest>'?` for an error message, or "" when nothing is close."""
    hint = closest(name, valid)
    return f"; did you mean '{prefix}{hint}'?" if hint else ""


def unknown_key_error(key: str, valid: typing.Iterable[str], where: str) -> ConfigError:
    valid = sorted(valid)
    suggestion = did_you_mean(key, valid) or f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"{where}: unknown key '{key}'{suggestion}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce_str(value: str, tp: type) -> Any:
    """Values typed on the command line (or YAML's '1e-5', a string in YAML 1.1)."""
    if tp is bool:
        low = value.lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ValueError
    if tp is int:
        return int(value)
    if tp is float:
        return float(value)
    raise ValueError


def check_value(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp` where that is lossless, else raise ConfigError."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _check_union(value, typing.get_args(tp), where)
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
    if origin in (list, tuple, set, typing.Sequence) or tp in (list, tuple):
        return _check_sequence(value, origin, typing.get_args(tp), where)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r} ({type(value).__name__})")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: expected one of {[e.value for e in tp]}, got {value!r}") from None
    return _check_scalar(value, tp, where)


def _check_union(value: Any, args: tuple, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    # try exact matches before coercions, so a str stays a str in Union[str, float]
    for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is not type(value)):
        try:
            return check_value(value, arg, where)
        except ConfigError:
            pass
    names = " or ".join(_type_name(a) for a in args)
    raise ConfigError(f"{where}: expected {names}, got {value!r} ({type(value).__name__})")


def _check_sequence(value: Any, origin: Any, args: tuple, where: str) -> Any:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")] if value else []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
    item_tp = args[0] if args else Any
    items = [check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _check_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected float, got {value!r} (bool)")
        if isinstance(value, (int, float)):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp in (bool, str):
        if isinstance(value, tp):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    else:  # an annotation we do not model (Callable, forward refs): accept
        return value
    if isinstance(value, str) and tp in (bool, int, float):
        try:
            return _coerce_str(value, tp)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def field_types(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # annotations that cannot be resolved at run time: fall back to raw ones
        hints = {}
    return {f.name: hints.get(f.name, f.type if not isinstance(f.type, str) else Any) for f in dataclasses.fields(cls)}


def check_mapping(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check keys and value types of `values` against dataclass `cls`; return coerced values."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    types_by_name = {name: tp for name, tp in field_types(cls).items() if not name.startswith("_")}
    bounds = field_bounds(cls)
    checked = {}
    for key, value in values.items():
        if key not in types_by_name:
            raise unknown_key_error(key, types_by_name, where)
        checked[key] = check_value(value, types_by_name[key], f"{where}.{key}")
        check_range(checked[key], bounds.get(key, {}), key, where)
    return checked


def field_bounds(cls: type) -> dict[str, dict[str, Any]]:
    """The declared range (`ge`/`gt`/`le`/`lt`/`warn_above` metadata, see llmreg.core.regularizer.option) of
    each field of dataclass `cls` that has one."""
    keys = (*BOUND_KEYS, "warn_above")
    out = {}
    for f in dataclasses.fields(cls):
        bounds = {k: f.metadata[k] for k in keys if k in f.metadata}
        if bounds:
            out[f.name] = bounds
    return out


def check_fields_in_range(obj: Any) -> None:
    """Check the declared ranges of a dataclass instance built directly (not through check_mapping), e.g. from
    an options class's `__post_init__`; raises ValueError (ConfigError) naming the field."""
    for name, bounds in field_bounds(type(obj)).items():
        check_range(getattr(obj, name), bounds, name, type(obj).__name__, warn=False)


def build_options(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from `values` after checking them."""
    checked = check_mapping(cls, values, where)
    try:
        return cls(**checked)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def options_help(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each option field."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        type_name = _type_name(field_types(cls)[f.name])
        rng = range_text(f.metadata)
        rows.append((f.name, f"{type_name}, {rng}" if rng else type_name, default, f.metadata.get("help", "")))
    return rows
