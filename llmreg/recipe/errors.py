"""Helpers that keep every recipe error a one-line `ConfigError` with a location."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator

from llmreg.core.options import ConfigError, ConfigWarning


class RecipeWarning(ConfigWarning):
    """A recipe that validates but probably does not do what its author meant; the CLI prints `warning: <message>`."""


def warn_recipe(message: str) -> None:
    warnings.warn(message, RecipeWarning, stacklevel=2)


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


@contextlib.contextmanager
def at_recipe_key(where: str) -> Iterator[None]:
    """The error boundary of building and starting a run: any exception of the block (a library's, e.g. the
    optimizer refusing a value or TRL failing to prepare a dataset) becomes a one-line
    `ConfigError("<where>: <Type>: <message>")` naming the recipe key involved; the original stays chained as
    `__cause__`, which the CLI prints with --debug. A ConfigError already names its key and passes unchanged, and
    so does an AssertionError (a bug, not bad input: it keeps its traceback)."""
    try:
        yield
    except (ConfigError, AssertionError):
        raise
    except Exception as err:
        raise ConfigError(f"{where}: {type(err).__name__}: {one_line(err)}") from err


def one_line_config_warnings() -> None:
    """ConfigWarnings (a legal but absurd value) as one line `warning: ...`, each once per run (validation and
    the regularizer's own build see the same value)."""
    shown, default = set(), warnings.showwarning
    warnings.simplefilter("always", ConfigWarning)

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, ConfigWarning):
            return default(message, category, filename, lineno, file, line)
        text = str(message)
        if text.split(": ", 1)[-1] not in shown:
            shown.add(text.split(": ", 1)[-1])
            print(f"warning: {text}", file=sys.stderr)

    warnings.showwarning = show
