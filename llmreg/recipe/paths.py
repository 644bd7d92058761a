"""Where a relative path in a recipe points.

A relative path resolves against the current working directory first (what a
user typing `trainer.deepspeed=ds_configs/zero2.json` means), then against the
recipe file's directory (what a recipe author shipping `data: train.jsonl`
next to the recipe means). The first that exists wins; when neither exists the
cwd-based path is kept so the error names what the user wrote.
"""

from __future__ import annotations

import os

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
TEXT_EXTENSIONS = (".txt", ".text", ".md")  # raw text: only the pretrain data mode reads it (llmreg.pretrain.data)


def resolve_path(path: str, recipe_dir: str | None) -> str:
    """Absolute form of `path` (see module docstring)."""
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return path
    candidates = [os.path.abspath(path)]
    if recipe_dir:
        candidates.append(os.path.abspath(os.path.join(recipe_dir, path)))
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    return candidates[0]


def looks_like_path(value: str) -> bool:
    """A string meant as a local file: has a separator, a data-file extension, or starts like a path."""
    return "/" in value or os.sep in value or value.startswith((".", "~")) or value.lower().endswith(DATA_EXTENSIONS)


def looks_local(value: str) -> bool:
    """A model/tokenizer string that can only be a local path (a hub id is `owner/name`, never `./x` or `/x`)."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1
