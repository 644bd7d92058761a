"""The `pretrain` data mode of a recipe: a fixed token budget of raw text, packed into fixed-length blocks.

    data:
      train: ../shared/data/tinystories/tinystories_validation_first1000.txt   # .txt, or a file with a text column
      pretrain:
        block_size: 128            # tokens per training sequence (the paper: 4,096)
        token_budget: 65536        # the seed set: the first N tokens of the training documents (None: all)
        validation_fraction: 0.1   # the last 10% of the documents are held out (unless data.eval is set)
        synthetic: {...}           # optional: distillation (llmreg.pretrain.distill)

Pipeline (pure functions below, `pretrain_datasets` at build time):
text -> documents (split on `document_separator`; blank lines for a .txt) -> token ids, each document
starting with the tokenizer's BOS (if it adds one) and ending with EOS -> the held-out documents are the
LAST `validation_fraction` of them (the same for every run and seed, so losses compare) -> the training
stream is cut to `token_budget` tokens and packed into `block_size` blocks (the remainder is dropped).
Blocks cross document boundaries, as in Levanter's packed pre-training; attention is not masked at the
boundaries (departure: none known in the reference, which packs the same way).

Epochs: `trainer.num_train_epochs` repeats the same blocks; the HF Trainer draws a new permutation each
epoch from `data_seed` (defaulting to the recipe `seed`), so an ensemble member with seed k differs in
initialisation and data order (the paper's train_seed = data_seed).

Labels are the input ids themselves (no padding, every block is full), made by `collate_blocks`: the
language-modelling collator would mask every token equal to the pad token, which for tokenizers that pad
with EOS would drop the document ends from the loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmreg.core.options import ConfigError, check_mapping
from llmreg.recipe.paths import TEXT_EXTENSIONS, looked_for, resolve_path

SAMPLING_MODES = ("pooled", "logit_average")


@dataclass
class SyntheticSpec:
    """`data.pretrain.synthetic`: sequence-level distillation data (llmreg.pretrain.distill)."""

    teachers: list[str] = field(default_factory=list)  # model folders; several = an ensemble
    fraction: float = 0.75  # share w of training blocks that are synthetic (the paper: 0.75 or 0.9)
    num_sequences: int = 256  # sequences generated (each one block: BOS + block_size - 1 sampled tokens)
    sampling: str = "pooled"  # pooled: an equal share from each teacher; logit_average: from the ensemble
    temperature: float = 1.0  # no top-k / top-p (package default, as the paper's vLLM sampling)
    seed: int = 0
    batch_size: int = 16
    cache_dir: str | None = None  # where the corpus is written; None: <output_dir>/synthetic


@dataclass
class PretrainSpec:
    block_size: int = 128
    token_budget: int | None = None
    validation_fraction: float = 0.1
    document_separator: str = "\n\n"
    synthetic: SyntheticSpec | None = None


def validate_pretrain(section: Any, recipe_dir: str | None, where: str = "data.pretrain") -> PretrainSpec:
    """Check `data.pretrain` (no file is read but the teachers' config.json existence)."""
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping (block_size, token_budget, ...), got {section!r}")
    section = dict(section or {})
    synthetic = section.pop("synthetic", None)  # a mapping here, a SyntheticSpec once checked
    values = check_mapping(PretrainSpec, section, where)
    spec = PretrainSpec(**values)
    if spec.block_size < 2:
        raise ConfigError(f"{where}.block_size: must be >= 2, got {spec.block_size}")
    if spec.token_budget is not None and spec.token_budget < spec.block_size:
        raise ConfigError(f"{where}.token_budget: {spec.token_budget} is less than one block ({spec.block_size})")
    if not 0.0 <= spec.validation_fraction < 1.0:
        raise ConfigError(f"{where}.validation_fraction: must be in [0, 1), got {spec.validation_fraction}")
    if not spec.document_separator:
        raise ConfigError(f"{where}.document_separator: must not be empty")
    if synthetic is not None:
        spec.synthetic = _validate_synthetic(synthetic, recipe_dir, f"{where}.synthetic")
    return spec


def _validate_synthetic(section: Any, recipe_dir: str | None, where: str) -> SyntheticSpec:
    spec = SyntheticSpec(**check_mapping(SyntheticSpec, section, where))
    if not spec.teachers:
        raise ConfigError(f"{where}.teachers: give at least one teacher model folder")
    if not 0.0 < spec.fraction < 1.0:
        raise ConfigError(f"{where}.fraction: the synthetic share must be in (0, 1), got {spec.fraction}")
    if spec.sampling not in SAMPLING_MODES:
        from llmreg.core.options import closest

        hint = closest(spec.sampling, SAMPLING_MODES)
        raise ConfigError(
            f"{where}.sampling: unknown value {spec.sampling!r}"
            + (f"; did you mean '{hint}'?" if hint else "")
            + f" (one of {', '.join(SAMPLING_MODES)})"
        )
    if spec.temperature <= 0:
        raise ConfigError(f"{where}.temperature: must be > 0, got {spec.temperature}")
    for key in ("num_sequences", "batch_size"):
        if getattr(spec, key) < 1:
            raise ConfigError(f"{where}.{key}: must be >= 1, got {getattr(spec, key)}")
    teachers = []
    for i, path in enumerate(spec.teachers):
        full = resolve_path(path, recipe_dir)
        if not os.path.isfile(os.path.join(full, "config.json")):
            raise ConfigError(
                f"{where}.teachers[{i}]: no model folder (config.json) at {path} {looked_for(path, recipe_dir)}; "
                "train the teacher first (see recipes/pretrain/README.md)"
            )
        teachers.append(full)
    spec.teachers = teachers
    if spec.cache_dir is not None:
        spec.cache_dir = os.path.abspath(os.path.expanduser(spec.cache_dir))
    return spec


# -- pure functions ----------------------------------------------------------------------------------


def split_documents(text: str, separator: str = "\n\n") -> list[str]:
    """Non-empty documents of `text`, stripped."""
    return [doc.strip() for doc in text.split(separator) if doc.strip()]


def tokenize_documents(docs: list[str], tokenizer) -> list[list[int]]:
    """Token ids per document, each ending with EOS (the tokenizer adds BOS if it is configured to)."""
    ids = tokenizer(docs, add_special_tokens=True)["input_ids"] if docs else []
    eos = tokenizer.eos_token_id
    return [list(x) + ([eos] if eos is not None and (not x or x[-1] != eos) else []) for x in ids]


def hold_out(docs: list, fraction: float) -> tuple[list, list]:
    """(train, validation): the last `fraction` of the documents (at least one when fraction > 0)."""
    if fraction <= 0:
        return list(docs), []
    n_val = max(1, round(len(docs) * fraction))
    if n_val >= len(docs):
        raise ConfigError(
            f"data.pretrain.validation_fraction {fraction} leaves no training documents ({len(docs)} documents)"
        )
    return list(docs[:-n_val]), list(docs[-n_val:])


def pack(token_docs: list[list[int]], block_size: int, token_budget: int | None = None) -> np.ndarray:
    """Concatenate, keep the first `token_budget` tokens, cut into full blocks (the remainder is dropped):
    an int32 array [blocks, block_size] (numpy, not lists: the paper's seed set is 210M tokens)."""
    stream = (
        np.concatenate([np.asarray(d, dtype=np.int32) for d in token_docs])
        if token_docs
        else np.zeros(0, dtype=np.int32)
    )
    if token_budget is not None:
        if token_budget > len(stream):
            raise ConfigError(
                f"data.pretrain.token_budget: {token_budget} tokens asked, the training text has only {len(stream)}"
            )
        stream = stream[:token_budget]
    n = len(stream) // block_size
    return stream[: n * block_size].reshape(n, block_size)


def blocks_dataset(blocks):
    """A `datasets.Dataset` with one column, input_ids (the labels are the same ids: `collate_blocks`)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": np.asarray(blocks, dtype=np.int32)})


def collate_blocks(features: list[dict]) -> dict:
    """Full blocks -> input_ids and labels (equal; the model shifts them); no padding, no attention mask."""
    import torch

    ids = torch.tensor(np.stack([np.asarray(f["input_ids"]) for f in features]), dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


# -- build time --------------------------------------------------------------------------------------


def read_documents(path: str, separator: str, role: str) -> list[str]:
    """Documents of a text file (split on `separator`) or of a data file's `text` column."""
    if path.lower().endswith(TEXT_EXTENSIONS):
        with open(path, encoding="utf-8") as f:
            return split_documents(f.read(), separator)
    raise ConfigError(f"data.{role}: internal: {path} is not a text file")  # other sources go through load_source


def _source_documents(source, separator: str, role: str) -> list[str]:
    if source.kind == "local" and source.path.lower().endswith(TEXT_EXTENSIONS):
        docs = read_documents(source.path, source.separator or separator, role)[source.skip or 0 :]
        return docs[: source.max_examples] if source.max_examples is not None else docs
    from llmreg.recipe.sources import load_source

    ds = load_source(source, "hf", role)
    if "text" not in ds.column_names:
        raise ConfigError(f"data.{role}: pre-training reads a 'text' column, found {ds.column_names}; set text_field")
    return [t for t in ds["text"] if t and t.strip()]


def pretrain_blocks(recipe, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(training blocks of the budget, validation blocks) of a recipe with `data.pretrain`."""
    spec: PretrainSpec = recipe.data.pretrain
    train_docs = tokenize_documents(_source_documents(recipe.data.train, spec.document_separator, "train"), tokenizer)
    if recipe.data.eval is not None:
        val_docs = tokenize_documents(_source_documents(recipe.data.eval, spec.document_separator, "eval"), tokenizer)
    else:
        train_docs, val_docs = hold_out(train_docs, spec.validation_fraction)
    train = pack(train_docs, spec.block_size, spec.token_budget)
    val = pack(val_docs, spec.block_size)
    if not len(train):
        raise ConfigError(f"data.train: fewer tokens than one block of {spec.block_size}")
    if val_docs and not len(val):
        raise ConfigError(
            f"data.pretrain: the validation documents have fewer tokens than one block "
            f"({spec.block_size}); raise validation_fraction"
        )
    return train, val


def pretrain_datasets(recipe, tokenizer, args=None):
    """(train, eval or None) datasets of blocks; with `synthetic`, the real/synthetic mix (distill.py)."""
    train, val = pretrain_blocks(recipe, tokenizer)
    spec: PretrainSpec = recipe.data.pretrain
    if spec.synthetic is not None:
        from llmreg.pretrain.distill import mix_blocks, synthetic_blocks

        cache = spec.synthetic.cache_dir or os.path.join(recipe.output_dir, "synthetic")
        synthetic = synthetic_blocks(spec.synthetic, spec.block_size, tokenizer, cache, args=args)
        train = mix_blocks(train, synthetic, spec.synthetic.fraction, seed=spec.synthetic.seed)
    return blocks_dataset(train), (blocks_dataset(val) if len(val) else None)


def check_pretrain_recipe(recipe) -> None:
    """Recipe-level checks of the pretrain mode (after the sections are validated)."""
    if recipe.trainer.kind != "hf":
        raise ConfigError(f"data.pretrain: pre-training runs with trainer kind 'hf', not '{recipe.trainer.kind}'")
    if recipe.peft is not None:
        raise ConfigError("data.pretrain: pre-training trains every weight; drop the peft section")
    optim = str(recipe.trainer.args.get("optim", "adamw_torch"))
    # the recipe's weight decays are decoupled AdamW values (theta <- theta - lr*wd*theta); an optimizer that
    # adds wd*theta to the gradient (Adam + L2, Adafactor, SGD) would make them mean something else
    if not optim.startswith("adamw"):
        raise ConfigError(
            f"trainer.optim: pre-training recipes assume decoupled AdamW weight decay, got {optim!r}; "
            "use an adamw_* optimizer (e.g. adamw_torch)"
        )
