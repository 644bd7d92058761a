"""Helpers that keep every recipe error a one-line `ConfigError` with a location."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from llmreg.core.options import ConfigError


def one_line(err: BaseException) -> str:
    """`err`'s message with newlines and runs of spaces collapsed (library errors are often multi-line)."""
    return " ".join(str(err).split())


@contextlib.contextmanager
def reraise_at_recipe_key(where: str, catch: tuple[type[BaseException], ...] = (ConfigError,)) -> Iterator[None]:
    """Re-raise `catch` errors from the block (often a library's) as `ConfigError("<where>: <message>")`, where
    `where` names the recipe key the failing value came from (e.g. "trainer", "model.name_or_path")."""
    try:
        yield
    except catch as err:
        raise ConfigError(f"{where}: {one_line(err)}") from None
