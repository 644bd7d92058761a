"""The `data:` section: which sources are valid, and how each one is loaded.

A source is a string or a mapping with `path`:

    data:
      train: builtin:arithmetic              # generated locally, format picked from trainer.kind
      eval: {path: data/dev.jsonl, max_examples: 200}
      num_examples: 2000                     # keys beside train/eval are defaults for both

`path` is a `.jsonl/.json/.parquet/.csv` file, a text file (`.txt/.text/.md`: one `text` row per
blank-line-separated paragraph, or per `separator`), a directory written by
`Dataset.save_to_disk`, `hub:<name>` (needs the hub: refused when
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) or `builtin:<task>`. Hub datasets
take an explicit prefix so that a mistyped local path (`data/trian.jsonl`) is a
"file not found" at validation time instead of a failed download later.
`skip: N` drops the first N rows before `max_examples` keeps the next ones.

`data.train` may be a list of sources, each with a `weight`, mixed as `data.mix` says: a data mixture, e.g.
replay of general text beside the task data (llmreg.recipe.mixture).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from llmreg.core.options import ConfigError, check_mapping, did_you_mean
from llmreg.recipe.data_modes import data_mode
from llmreg.recipe.errors import reraise_at_recipe_key
from llmreg.recipe.mixture import validate_mix
from llmreg.recipe.paths import DATA_EXTENSIONS, TEXT_EXTENSIONS, looked_for, looks_like_path, resolve_path
from llmreg.recipe.schema import BUILTIN_FORMATS, DataSpec, SourceSpec, as_chat_turns

DEFAULT_NUM_EXAMPLES = 1000
DEFAULT_SEPARATOR = "\n\n"  # a text file's rows: its blank-line-separated paragraphs (as data.pretrain reads it)
# files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` always write
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class _DataKeys:
    train: str | dict | list | None = None  # a list: a mixture of sources (llmreg.recipe.mixture)
    eval: str | dict | list | None = None  # a list is refused with a clear message (mixtures are for train)
    split: str | None = None
    subset: str | None = None
    max_examples: int | None = None
    text_field: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    chat: bool | None = None
    num_examples: int | None = None
    seed: int | None = None
    pretrain: dict | None = None  # the data mode llmreg.pretrain registers: packed pre-training blocks (raw .txt)
    mix: dict | None = None  # how a list of train sources is mixed (llmreg.recipe.mixture)


def validate_data(section: dict, recipe_dir: str | None, seed: int = 0) -> DataSpec:
    """The `data:` section; `seed` (the recipe's) is the default seed of a mixture's draw."""
    values = check_mapping(_DataKeys, section, "data")
    if values.get("train") is None:
        raise ConfigError("data: missing key 'train' (a file, a save_to_disk directory, hub:<name> or builtin:<task>)")
    shared = {k: v for k, v in values.items() if k not in ("train", "eval", "pretrain", "mix") and v is not None}
    pretrain = None
    if "pretrain" in values:  # a data mode registered by llmreg.pretrain (llmreg.recipe.data_modes)
        pretrain = data_mode("pretrain").validate(values["pretrain"], recipe_dir)
    mix = None
    if isinstance(values["train"], list):
        if pretrain is not None:
            raise ConfigError("data.train: a list of sources (a mixture) is not supported with data.pretrain")
        if not values["train"]:
            raise ConfigError("data.train: an empty list; give one source or a list of sources to mix")
        train = [
            _validate_source(item, shared, f"data.train[{i}]", recipe_dir, is_eval=False, in_list=True)
            for i, item in enumerate(values["train"])
        ]
        mix = validate_mix(values.get("mix"), train, seed)
    else:
        if values.get("mix") is not None:
            raise ConfigError("data.mix: mixes a list of sources; data.train is one source")
        train = _validate_source(values["train"], shared, "data.train", recipe_dir, is_eval=False)
    eval_ = None
    if isinstance(values.get("eval"), list):
        raise ConfigError("data.eval: one source (a list of sources is a training mixture, for data.train)")
    if values.get("eval") is not None:
        eval_ = _validate_source(values["eval"], shared, "data.eval", recipe_dir, is_eval=True)
    return DataSpec(train=train, eval=eval_, pretrain=pretrain, mix=mix)


def _validate_source(
    value: Any, shared: dict, where: str, recipe_dir: str | None, is_eval: bool, in_list: bool = False
) -> SourceSpec:
    if not isinstance(value, (str, dict)):
        raise ConfigError(f"{where}: expected a path or a mapping with 'path', got {value!r}")
    own = {"path": value} if isinstance(value, str) else dict(value)
    if "path" not in own:
        raise ConfigError(
            f"{where}: missing key 'path' (a file, a save_to_disk directory, hub:<name> or builtin:<task>)"
        )
    spec = SourceSpec(**check_mapping(SourceSpec, {**shared, **own}, where))
    if spec.weight is not None and not in_list:
        raise ConfigError(f"{where}.weight: a weight belongs to a source of a list (a mixture: data.train: [...])")
    _check_fields(spec, where)
    if spec.kind == "builtin":
        _check_builtin(spec, where, own_seed="seed" in own, is_eval=is_eval)
    elif spec.kind == "hub":
        _check_hub(spec, where)
    else:
        spec.path = _check_local(spec, where, recipe_dir)
    if spec.separator is not None and not (spec.kind == "local" and spec.path.lower().endswith(TEXT_EXTENSIONS)):
        raise ConfigError(f"{where}.separator: splits a text file ({', '.join(TEXT_EXTENSIONS)}) into rows only")
    if spec.separator == "":
        raise ConfigError(f"{where}.separator: must not be empty")
    return spec


def _check_fields(spec: SourceSpec, where: str) -> None:
    """Column mapping: a text column, or a prompt and a completion column (both: one without the other
    would leave the SFT trainer a half-renamed dataset it cannot read)."""
    if (spec.prompt_field is None) != (spec.completion_field is None):
        raise ConfigError(f"{where}: set prompt_field and completion_field together")
    if spec.prompt_field is not None and spec.text_field is not None:
        raise ConfigError(f"{where}: set text_field or prompt_field/completion_field, not both")
    if spec.prompt_field is not None and spec.prompt_field == spec.completion_field:
        raise ConfigError(f"{where}: prompt_field and completion_field name the same column '{spec.prompt_field}'")
    if spec.chat and spec.prompt_field is None:
        raise ConfigError(f"{where}.chat: needs prompt_field and completion_field (the user and assistant turns)")
    if spec.prompt_field is not None and spec.kind == "builtin":
        raise ConfigError(f"{where}: built-in data already has its columns; drop prompt_field/completion_field")


def _check_builtin(spec: SourceSpec, where: str, own_seed: bool, is_eval: bool) -> None:
    from llmreg.data.builtin import BUILTIN_TASKS

    if spec.name not in BUILTIN_TASKS:
        suggestion = did_you_mean(spec.name, BUILTIN_TASKS, prefix="builtin:")
        raise ConfigError(
            f"{where}: unknown built-in task '{spec.name}'{suggestion} (built-in: {', '.join(BUILTIN_TASKS)})"
        )
    if spec.num_examples is None:
        spec.num_examples = DEFAULT_NUM_EXAMPLES
    elif spec.num_examples < 1:  # 0 used to fall back to the default silently
        raise ConfigError(f"{where}.num_examples: must be >= 1 rows to generate, got {spec.num_examples}")
    if spec.skip and spec.skip >= spec.num_examples:  # else an IndexError once the model has loaded
        raise ConfigError(f"{where}.skip: skips {spec.skip} rows, and the built-in task generates {spec.num_examples}")
    if spec.seed is None:
        spec.seed = 0
    if is_eval and not own_seed:
        spec.seed += 1  # a built-in eval set drawn like the train set would repeat the training rows


def _check_hub(spec: SourceSpec, where: str) -> None:
    if not spec.name:
        raise ConfigError(f"{where}: 'hub:' needs a dataset name, e.g. hub:openai/gsm8k")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            raise ConfigError(f"{where}: hub dataset '{spec.name}' needs the hub, but {var} is set")


def _check_local(spec: SourceSpec, where: str, recipe_dir: str | None) -> str:
    path = resolve_path(spec.path, recipe_dir)
    if not os.path.exists(path):
        if looks_like_path(spec.path):
            raise ConfigError(f"{where}: data file not found: {spec.path} {looked_for(spec.path, recipe_dir)}")
        raise ConfigError(
            f"{where}: '{spec.path}' is not a local file or directory {looked_for(spec.path, recipe_dir)}; write "
            f"hub:{spec.path} for a hub dataset or builtin:arithmetic for built-in data"
        )
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, m)) for m in SAVED_DATASET_MARKERS):
            raise ConfigError(f"{where}: directory {spec.path} was not written by Dataset.save_to_disk")
        return path
    # raw text (.txt): one `text` row per paragraph (data.pretrain packs it); like a data file, it has no splits
    if not path.lower().endswith(DATA_EXTENSIONS + TEXT_EXTENSIONS):
        raise ConfigError(
            f"{where}: unsupported data file {spec.path}; use one of {', '.join(DATA_EXTENSIONS + TEXT_EXTENSIONS)}"
        )
    if spec.split not in (None, "train"):
        raise ConfigError(f"{where}: a single file has no split '{spec.split}'; drop split or use a directory")
    return path


# -- loading (build time) ------------------------------------------------------------------------


def load_source(spec: SourceSpec, trainer_kind: str, role: str, where: str | None = None):
    """The `datasets.Dataset` for `spec`, with `skip`, `max_examples` and the column mapping applied; errors
    name `where` (default `data.<role>`)."""
    with reraise_at_recipe_key(where or f"data.{role}", (ValueError, FileNotFoundError)):
        ds = _load_raw(spec, trainer_kind, role)
        if spec.skip or spec.max_examples is not None:
            start = min(spec.skip or 0, len(ds))
            stop = len(ds) if spec.max_examples is None else min(start + spec.max_examples, len(ds))
            ds = ds.select(range(start, stop))
        if spec.text_field and spec.text_field != "text":
            if spec.text_field not in ds.column_names:
                raise ConfigError(f"text_field '{spec.text_field}' is not a column (columns: {ds.column_names})")
            ds = ds.rename_column(spec.text_field, "text")
        if spec.prompt_field is not None:
            # GRPO: the second column is the reference answer the reward function reads
            ds = _as_prompt_completion(
                ds, spec.prompt_field, spec.completion_field, "answer" if trainer_kind == "grpo" else "completion"
            )
            if spec.chat:
                ds = ds.map(as_chat_turns, desc="chat turns")
    return ds


def _as_prompt_completion(ds, prompt: str, completion: str, completion_name: str = "completion"):
    """Keep only the two columns, named as TRL's SFT expects; other columns (e.g. an unrelated `text`)
    would make TRL pick a different dataset format."""
    for field_name in (prompt, completion):
        if field_name not in ds.column_names:
            raise ConfigError(f"'{field_name}' is not a column (columns: {ds.column_names})")
    ds = ds.select_columns([prompt, completion])
    return ds.rename_columns({k: v for k, v in ((prompt, "prompt"), (completion, completion_name)) if k != v})


def _load_raw(spec: SourceSpec, trainer_kind: str, role: str):
    import datasets

    if spec.kind == "builtin":
        from llmreg.data import make_builtin_dataset

        return make_builtin_dataset(
            spec.name, format=BUILTIN_FORMATS[trainer_kind], num_examples=spec.num_examples, seed=spec.seed
        )
    if spec.kind == "hub":
        return _pick_split(datasets.load_dataset(spec.name, spec.subset, split=spec.split), spec, role)
    if os.path.isdir(spec.path):
        return _pick_split(datasets.load_from_disk(spec.path), spec, role)
    if spec.path.lower().endswith(TEXT_EXTENSIONS):
        return datasets.Dataset.from_dict({"text": read_text_rows(spec.path, spec.separator)})
    loaders = {
        ".jsonl": datasets.Dataset.from_json,
        ".json": datasets.Dataset.from_json,
        ".parquet": datasets.Dataset.from_parquet,
        ".csv": datasets.Dataset.from_csv,
    }
    return loaders[os.path.splitext(spec.path)[1].lower()](spec.path)


def _pick_split(ds, spec: SourceSpec, role: str):
    """A Dataset from a Dataset or DatasetDict: `split`, else train / validation / test by role."""
    if not hasattr(ds, "keys"):
        return ds
    wanted = [spec.split] if spec.split else (["train"] if role == "train" else ["validation", "test"])
    for name in wanted:
        if name in ds:
            return ds[name]
    raise ConfigError(f"{spec.path} has splits {list(ds.keys())}, none of {wanted}; set split")


def read_text_rows(path: str, separator: str | None = None) -> list[str]:
    """The rows of a text file: its pieces between `separator`s (a blank line by default), stripped, empty ones
    dropped (llmreg.pretrain.data.split_documents does the same for pre-training)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [row.strip() for row in text.split(separator or DEFAULT_SEPARATOR) if row.strip()]
