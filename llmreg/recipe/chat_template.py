"""`trainer.chat_template_path` (TRL's SFTConfig): checked like the recipe's other paths, before anything loads.

TRL reads the value as a Jinja file when it is an existing file ending in `.jinja` / `.j2`, and otherwise as a
tokenizer (a local folder or a hub id) whose chat template it clones, adding that tokenizer's special tokens and
resizing the model's embeddings. A missing file would otherwise surface only after the model loaded, as a hub
lookup of the file name; a file with another extension would be taken for a tokenizer.
"""

from __future__ import annotations

import os

from llmreg.core.options import ConfigError
from llmreg.recipe.paths import looked_for, looks_local, resolve_path

TEMPLATE_EXTENSIONS = (".jinja", ".j2")  # what TRL's SFTTrainer reads as a template file
WHERE = "trainer.chat_template_path"


def validate_chat_template_path(value: str, recipe_dir: str | None) -> str:
    """The absolute path of a template file or tokenizer folder, or a hub id unchanged; a ConfigError otherwise."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{WHERE}: expected a .jinja file, a tokenizer folder or a hub id, got {value!r}")
    path = resolve_path(value, recipe_dir)
    if os.path.isfile(path):
        if not path.endswith(TEMPLATE_EXTENSIONS):
            raise ConfigError(
                f"{WHERE}: {value} is a file but not a template: TRL reads only {' / '.join(TEMPLATE_EXTENSIONS)} "
                "files as Jinja chat templates"
            )
        return path
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            raise ConfigError(f"{WHERE}: {path} is a folder without tokenizer_config.json (not a tokenizer)")
        return path
    if looks_local(value) or value.endswith(TEMPLATE_EXTENSIONS):
        raise ConfigError(f"{WHERE}: file not found: {value} {looked_for(value, recipe_dir)}")
    return value  # a hub tokenizer id (owner/name): TRL clones its template when the trainer is built
