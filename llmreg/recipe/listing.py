"""What `llmreg list` prints: a table of the registered regularizers, then their options.

The table says what a recipe author needs to pick one: the trainer kinds it supports (`trainer.kind`), whether
it works with a `peft:` section and under DeepSpeed ZeRO-3 (the stack refuses the combinations marked "no" at
validation), and its first docstring line. The options follow, one block per regularizer, with type, default
and help (`llmreg.core.options.options_help`).
"""

from __future__ import annotations

import sys

from llmreg.core.options import ConfigError, did_you_mean, options_help
from llmreg.core.registry import available

DESCRIPTION_WIDTH = 64  # the table's last column, cut with "..." (the options section repeats it whole)


def first_doc_line(cls: type) -> str:
    """The class docstring's first line, else its module's (a method module opens with what it is)."""
    doc = cls.__doc__ or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    lines = [line.strip() for line in doc.strip().splitlines()]
    return lines[0] if lines else ""


def table_rows(classes: dict[str, type]) -> list[tuple[str, str, str, str, str]]:
    """(name, trainer kinds, PEFT, ZeRO-3, description) per regularizer, with a header row first."""
    rows = [("regularizer", "trainer kinds", "PEFT", "ZeRO-3", "what it does")]
    for name, cls in classes.items():
        req = cls.requires
        text = first_doc_line(cls)
        if len(text) > DESCRIPTION_WIDTH:
            text = text[: DESCRIPTION_WIDTH - 3].rstrip() + "..."
        yes_no = ("no", "yes")
        rows.append((name, " ".join(req.trainers), yes_no[req.supports_peft], yes_no[req.supports_zero3], text))
    return rows


def registry_lines(name: str | None = None) -> list[str]:
    """The table, then the options of every regularizer (or only of `name`)."""
    classes = available()
    if name is not None:
        if name not in classes:
            raise ConfigError(
                f"list: unknown regularizer {name!r}"
                + did_you_mean(name, classes)
                + f" (registered: {', '.join(classes)})"
            )
        classes = {name: classes[name]}
    rows = table_rows(classes)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4] for row in rows]
    lines += ["", "Options (recipe: regularizers: [{name: NAME, OPTION: VALUE, ...}]):"]
    for reg, cls in classes.items():
        lines += ["", f"{reg}: {first_doc_line(cls)}"]
        lines += [
            f"    {opt} ({type_name}, default {default!r}): {help_text}"
            for opt, type_name, default, help_text in options_help(cls.options_cls)
        ]
    return lines
