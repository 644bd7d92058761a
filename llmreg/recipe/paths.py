"""Where a relative path in a recipe points.

A relative path (data, model, tokenizer, DeepSpeed config, suite) resolves against the current working
directory first (what a user typing `trainer.deepspeed=ds_configs/zero2.json` means), then against the recipe
file's directory (what a recipe author shipping `data: train.jsonl` next to the recipe means). The first that
exists wins; when neither exists the cwd-based path is kept, and the error names what the user wrote and every
absolute path tried (`looked_for`). `output_dir` is different: it is a place to write, so it resolves against the
working directory only (llmreg.recipe.sections).
"""

from __future__ import annotations

import os

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
TEXT_EXTENSIONS = (".txt", ".text", ".md")  # raw text: a `text` row per paragraph, or packed blocks (data.pretrain)


def resolve_path(path: str, recipe_dir: str | None) -> str:
    """Absolute form of `path` (see module docstring)."""
    tried = candidates(path, recipe_dir)
    return next((candidate for candidate in tried if os.path.exists(candidate)), tried[0])


def candidates(path: str, recipe_dir: str | None) -> list[str]:
    """The absolute paths `resolve_path` tries, in order."""
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return [path]
    found = [os.path.abspath(path)]
    if recipe_dir and os.path.abspath(os.path.join(recipe_dir, path)) not in found:
        found.append(os.path.abspath(os.path.join(recipe_dir, path)))
    return found


def looked_for(path: str, recipe_dir: str | None) -> str:
    """`(looked for /cwd/x, then /recipe/dir/x)`: the end of a not-found error."""
    return f"(looked for {', then '.join(candidates(path, recipe_dir))})"


def looks_like_path(value: str) -> bool:
    """A string meant as a local file: has a separator, a data-file extension, or starts like a path."""
    return "/" in value or os.sep in value or value.startswith((".", "~")) or value.lower().endswith(DATA_EXTENSIONS)


def looks_local(value: str) -> bool:
    """A model/tokenizer string that can only be a local path (a hub id is `owner/name`, never `./x` or `/x`)."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1
