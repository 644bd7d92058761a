"""Regularizer registry: `@register("name")` is the only registration step.

Names resolve to classes; unknown names get a "did you mean" error (the
pattern of lm-eval's task registry). The registry never imports a regularizer:
`import llmreg` imports `llmreg.regularizers`, whose modules register
themselves, so every built-in is known as soon as any part of llmreg is.
"""

from __future__ import annotations

from typing import Any

from llmreg.core.options import ConfigError, did_you_mean
from llmreg.core.regularizer import Regularizer

_REGISTRY: dict[str, type[Regularizer]] = {}


def register(name: str):
    """Class decorator: make `cls` available as `name` in recipes and `llmreg list`."""

    def decorate(cls: type[Regularizer]) -> type[Regularizer]:
        if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
            raise TypeError(f"@register({name!r}) expects a Regularizer subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"regularizer name {name!r} is already taken by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> dict[str, type[Regularizer]]:
    return dict(sorted(_REGISTRY.items()))


def get_regularizer_class(name: str) -> type[Regularizer]:
    if name not in _REGISTRY:
        suggestion = did_you_mean(name, _REGISTRY)
        raise ConfigError(f"unknown regularizer '{name}'{suggestion} (registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def build_regularizer(spec: Any) -> Regularizer:
    """A Regularizer from an instance, a registered name, or `{"name": ..., **options}`."""
    if isinstance(spec, Regularizer):
        return spec
    if isinstance(spec, str):
        return get_regularizer_class(spec)()
    if isinstance(spec, dict):
        if "name" not in spec:
            raise ConfigError(f"regularizer spec {spec!r} has no 'name'")
        options = {k: v for k, v in spec.items() if k != "name"}
        return get_regularizer_class(spec["name"])(**options)
    raise ConfigError(f"cannot build a regularizer from {spec!r}: pass an object, a name or a dict with 'name'")
