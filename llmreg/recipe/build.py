"""Recipe -> the objects of a run: training config, tokenizer, datasets, model, trainer.

Order matters: the TrainingArguments / TRL config comes first, because under
ZeRO-3 transformers builds the model inside `deepspeed.zero.Init` only when a
config with `deepspeed=` exists (docs/architecture.md, trap 10); then the tokenizer and the
data, so a bad dataset fails before a large model loads; the model last.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from llmreg.core.options import ConfigError
from llmreg.recipe.callbacks import MetricsJsonlCallback
from llmreg.recipe.data_modes import recipe_data_mode
from llmreg.recipe.errors import at_recipe_key, reraise_at_recipe_key
from llmreg.recipe.mixture import build_mixture
from llmreg.recipe.models import build_model, build_tokenizer, convert_gguf
from llmreg.recipe.schema import Recipe, trainer_config_class
from llmreg.recipe.sources import load_source

METRICS_FILE = "metrics.jsonl"


@dataclass
class Run:
    recipe: Recipe
    args: Any  # TrainingArguments or the TRL config
    tokenizer: Any
    trainer: Any


def build_run(recipe: Recipe, extra_regularizers: list | None = None) -> Run:
    """Everything `trainer.train()` needs; loads the tokenizer, the data and the model.

    `extra_regularizers`: objects appended to the recipe's regularizers (built by the caller)."""
    with at_recipe_key("trainer.deepspeed"):
        init_distributed_for_deepspeed(recipe)
    with at_recipe_key("trainer"):
        args = build_training_args(recipe)
    with at_recipe_key("model.gguf_file"):  # de-quantised once into the cache (main process first)
        convert_gguf(recipe, args)
    with at_recipe_key("tokenizer"):
        tokenizer = build_tokenizer(recipe.tokenizer)
    train_ds, eval_ds = build_datasets(recipe, tokenizer, args)
    with at_recipe_key("model"):
        model = build_model(recipe, tokenizer, args)
    with at_recipe_key("trainer"):  # the trainers prepare (tokenize) the data and run the regularizers' setup
        trainer = build_trainer(recipe, args, model, tokenizer, train_ds, eval_ds, extra_regularizers)
    return Run(recipe=recipe, args=args, tokenizer=tokenizer, trainer=trainer)


def build_datasets(recipe: Recipe, tokenizer, args) -> tuple[Any, Any]:
    """The train and eval datasets (eval None when the recipe has none), each failure named by its data key."""
    mode = recipe_data_mode(recipe)
    if mode is not None:  # e.g. packed blocks of a fixed token budget (data.pretrain, registered by llmreg.pretrain)
        with at_recipe_key("data.pretrain"):
            return mode.build_datasets(recipe, tokenizer, args)
    out = []
    for role, spec in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        with at_recipe_key(f"data.{role}"):
            ds = None if spec is None else load_sources(recipe, role)
            out.append(None if ds is None else prepare_dataset(ds, recipe, tokenizer, args))
    return out[0], out[1]


def load_sources(recipe: Recipe, role: str):
    """The dataset of `data.<role>`: its one source, or the mixture of a list of sources (llmreg.recipe.mixture)."""
    spec, kind = getattr(recipe.data, role), recipe.trainer.kind
    if not isinstance(spec, list):
        return load_source(spec, kind, role)
    parts = [load_source(s, kind, role, where=f"data.{role}[{i}]") for i, s in enumerate(spec)]
    return build_mixture(parts, spec, recipe.data.mix, kind)


def init_distributed_for_deepspeed(recipe: Recipe) -> None:
    """DeepSpeed on CPU: create the gloo process group before TrainingArguments (docs/architecture.md, trap 10),
    or DeepSpeed's batch-size check sees the wrong world size. A single process gets a world of one."""
    if recipe.trainer.args.get("deepspeed") is None or torch.cuda.is_available():
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_training_args(recipe: Recipe):
    """The kind's config class from the validated fields, plus machine-dependent defaults.

    `use_cpu` and `bf16` depend on the machine, so they are filled in here rather than in the
    resolved recipe: the same recipe.yaml then still uses the GPUs of a cluster.
    """
    kwargs = dict(recipe.trainer.args, output_dir=recipe.output_dir)
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)
        if "fp16" not in kwargs:
            kwargs.setdefault("bf16", False)  # TRL turns bf16 on by default; on CPU fp32 is the safe choice
    config_cls = trainer_config_class(recipe.trainer.kind)
    with reraise_at_recipe_key("trainer", (TypeError, ValueError)):
        return config_cls(**kwargs)


def prepare_dataset(ds, recipe: Recipe, tokenizer, args):
    """TRL trainers take the dataset as is; the plain Trainer (kind hf) gets token ids of the text column."""
    if recipe.trainer.kind != "hf":
        return ds
    if "text" not in ds.column_names:
        raise ConfigError(
            f"data: trainer kind 'hf' trains on a 'text' column, found {ds.column_names}; set data.text_field"
        )
    max_length = min(tokenizer.model_max_length, 4096)  # hub tokenizers may report a huge sentinel

    def tokenize(batch):
        ids = tokenizer(batch["text"], truncation=True, max_length=max_length)["input_ids"]
        ids = [_with_eos(x, tokenizer.eos_token_id, max_length) for x in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}

    with args.main_process_first(desc="tokenize"):
        return ds.map(tokenize, batched=True, remove_columns=ds.column_names)


def _with_eos(ids: list[int], eos: int | None, max_length: int) -> list[int]:
    """End each document with EOS, as TRL's SFT does, so the model learns where text stops."""
    if eos is None or (ids and ids[-1] == eos) or len(ids) >= max_length:
        return ids
    return ids + [eos]


def build_trainer(recipe: Recipe, args, model, tokenizer, train_ds, eval_ds, extra_regularizers=None):
    from llmreg.trainers import TRAINERS

    kind = recipe.trainer.kind
    regularizers = [*recipe.regularizers, *(extra_regularizers or [])]
    kwargs: dict[str, Any] = dict(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        regularizers=regularizers,
    )
    if kind == "hf":
        from transformers import DataCollatorForLanguageModeling

        kwargs["data_collator"] = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        mode = recipe_data_mode(recipe)
        if mode is not None and mode.collator is not None:  # pretrain: full blocks, labels = ids, no pad masking
            kwargs["data_collator"] = mode.collator
        if recipe.peft is not None:
            from peft import LoraConfig, get_peft_model

            kwargs["model"] = get_peft_model(model, LoraConfig(**recipe.peft))
    elif recipe.peft is not None:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(**recipe.peft)
    if kind == "grpo":
        kwargs["reward_funcs"] = [load_reward(recipe.trainer.reward)]
    trainer = TRAINERS[kind](**kwargs)
    trainer.add_callback(MetricsJsonlCallback(os.path.join(recipe.output_dir, METRICS_FILE)))
    if recipe.eval_during_training is not None:
        from llmreg.eval.callback import EvalSuiteCallback

        spec = recipe.eval_during_training
        EvalSuiteCallback(
            spec.suite,
            spec.every_steps,
            limit=spec.limit,
            batch_size=spec.batch_size,
            tokenizer=tokenizer,
            trainer=trainer,
        )
    return trainer


def load_reward(reward: str):
    """A reward function from a name in REWARDS or a `module:function` reference."""
    import importlib

    from llmreg.recipe.sections import REWARDS

    target = REWARDS.get(reward, reward)
    module_name, _, attr = target.partition(":")
    with reraise_at_recipe_key("trainer.reward", (ImportError, AttributeError, ValueError)):
        return getattr(importlib.import_module(module_name), attr)
