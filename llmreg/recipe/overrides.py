"""Dotted `key=value` overrides from the command line, applied to the raw recipe dict.

`trainer.learning_rate=1e-5`, `regularizers.0.lam=0.1`, `model.config.num_hidden_layers=4`.
Values go through `yaml.safe_load`, so `true`, `3`, `[a, b]` and `null` mean what
they mean in a recipe file. Overrides only edit the dict: an override of an
unknown key creates it, and validation then rejects it with the closest valid
key, exactly as if the key had been written in the file.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import yaml

from llmreg.core.options import ConfigError
from llmreg.recipe.errors import one_line


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (["a", "b", "0", "c"], parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. trainer.learning_rate=1e-5")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {text!r}: empty component in key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({one_line(err)})") from None
    return parts, value


def apply_overrides(recipe: dict, overrides: Iterable[str]) -> dict:
    """A copy of `recipe` with each `key=value` override applied in order."""
    result = copy.deepcopy(recipe) if recipe is not None else {}
    for text in overrides or ():
        parts, value = parse_override(text)
        _set_path(result, parts, value, text)
    return result


def _set_path(root: dict, parts: list[str], value: Any, text: str) -> None:
    node: Any = root
    for depth, part in enumerate(parts[:-1]):
        nxt = _child(node, part, text)
        if nxt is None:  # `peft: null` then `peft.r=8`: the section springs into existence
            nxt = {}
            _assign(node, part, nxt, text)
        elif not isinstance(nxt, (dict, list)):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"override {text!r}: {where} is {nxt!r}, not a mapping or list")
        node = nxt
    _assign(node, parts[-1], value, text)


def _child(node: Any, part: str, text: str) -> Any:
    if isinstance(node, list):
        index = _index(node, part, text)
        return node[index] if index < len(node) else None
    return node.get(part)


def _assign(node: Any, part: str, value: Any, text: str) -> None:
    if isinstance(node, dict):
        node[part] = value
        return
    index = _index(node, part, text)
    if index == len(node):  # one past the end appends: `regularizers.1.name=weight_decay` adds a second one
        node.append(value)
    else:
        node[index] = value


def _index(node: list, part: str, text: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"override {text!r}: '{part}' indexes a list, so it must be a number")
    index = int(part)
    if index > len(node):
        raise ConfigError(f"override {text!r}: index {index} is out of range (the list has {len(node)} items)")
    return index
