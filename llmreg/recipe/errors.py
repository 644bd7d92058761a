"""Helpers that keep every recipe error a one-line `ConfigError` with a location."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from llmreg.core.options import ConfigError


class RecipeWarning(UserWarning):
    """A recipe that validates but probably does not do what its author meant; the CLI prints `warning: <message>`."""


def warn_recipe(message: str) -> None:
    warnings.warn(message, RecipeWarning, stacklevel=2)


def show_recipe_warnings_as_one_line() -> None:
    """Print a RecipeWarning as `warning: <message>` on stderr, not in Python's file:line form (the CLI installs it)."""
    default = warnings.formatwarning
    if getattr(default, "llmreg", False):
        return

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, RecipeWarning):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    formatwarning.llmreg = True
    warnings.formatwarning = formatwarning


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
