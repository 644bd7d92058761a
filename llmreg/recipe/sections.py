"""The sections of a one-run recipe: raw dict -> `Recipe`, checked without loading a model, a tokenizer or data.

`llmreg.recipe.validate.validate_recipe` is the entry point: it sends a recipe with `stages:` to
llmreg.recipe.stages_validate (which validates each stage here) and any other recipe to `validate_run_recipe`.

Every key of every section is checked against a dataclass with
`llmreg.core.options.check_mapping`, so an unknown key names the closest valid
one and a value of the wrong type says what was expected. The trainer section
is checked against the config class of its kind (TrainingArguments, SFTConfig,
DPOConfig, GRPOConfig), `peft` against `peft.LoraConfig`, each regularizer
against its options class. What needs a file (data, a DeepSpeed config, a
local model) is checked for existence; a DeepSpeed config with an `optimizer`
block is refused here, before any run starts.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import typing
from dataclasses import dataclass
from typing import Any

from llmreg.core.options import ConfigError, check_mapping, closest, field_types
from llmreg.integrations.deepspeed import check_deepspeed_config, load_deepspeed_config
from llmreg.recipe.chat_template import validate_chat_template_path
from llmreg.recipe.data_checks import check_recipe_data
from llmreg.recipe.data_modes import data_mode
from llmreg.recipe.errors import reraise_at_recipe_key, warn_recipe
from llmreg.recipe.gguf import resolve_gguf_spec
from llmreg.recipe.importance_spec import validate_importance
from llmreg.recipe.paths import looked_for, looks_local, resolve_path
from llmreg.recipe.ranges import check_trainer_ranges
from llmreg.recipe.schema import (
    BUILTIN_TOKENIZERS,
    DTYPES,
    TRAINER_KINDS,
    EvalDuringTrainingSpec,
    ModelSpec,
    Recipe,
    TokenizerSpec,
    TrainerSpec,
    trainer_config_class,
)
from llmreg.recipe.sources import validate_data

DEFAULT_SEED = 42  # transformers' default, so a recipe without `seed` trains like the Trainer would
REWARDS = {
    "exact_answer": "llmreg.data.builtin:exact_answer_reward",
    "numeric_answer": "llmreg.data.rewards:numeric_answer_reward",
}  # GSM8K-style "#### 42"
# trainer fields the recipe fills in when it is silent (HF logs every 500 steps: too sparse for short runs)
TRAINER_DEFAULTS = {"logging_steps": 10, "report_to": "none", "save_strategy": "steps"}


@dataclass
class _RecipeKeys:
    model: dict | None = None
    tokenizer: dict | None = None
    data: dict | None = None
    trainer: dict | None = None
    peft: dict | None = None
    regularizers: list | None = None
    output_dir: str | None = None
    resume: bool = False
    seed: int = DEFAULT_SEED
    eval_during_training: dict | None = None
    importance: dict | None = None
    stages: list | None = None  # llmreg.recipe.stages_validate
    stage_eval: dict | None = None


def check_top_level(raw: Any) -> dict:
    """The top-level keys of a raw recipe, checked (unknown keys, types)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe: expected a mapping of sections, got {type(raw).__name__}")
    return check_mapping(_RecipeKeys, raw, "recipe")


def validate_run_recipe(raw: Any, recipe_path: str | None = None) -> Recipe:
    """Check a raw recipe without `stages:` (parsed YAML, overrides applied) and return its `Recipe`."""
    top = check_top_level(raw)
    if top.get("stages") is not None:
        raise ConfigError("stages: a recipe with stages is validated by llmreg.recipe.validate.validate_recipe")
    if top.get("stage_eval") is not None:
        raise ConfigError(
            "stage_eval: only a recipe with `stages:` evaluates after each stage; for one run use "
            "eval_during_training, or `llmreg eval` on its final model"
        )
    for name in ("model", "data", "trainer"):
        if top.get(name) is None:
            raise ConfigError(f"recipe: missing section '{name}'")
    recipe_dir = os.path.dirname(os.path.abspath(recipe_path)) if recipe_path else None
    seed = top.get("seed", DEFAULT_SEED)
    model = validate_model(top["model"], recipe_dir, seed)
    data = validate_data(top["data"], recipe_dir, seed)
    mode = data_mode("pretrain") if data.pretrain is not None else None  # llmreg.recipe.data_modes
    held_out = mode is not None and mode.holds_out_eval(data.pretrain)
    trainer = validate_trainer(top["trainer"], recipe_dir, seed, has_eval=data.eval is not None or held_out)
    peft = validate_peft(top.get("peft"))
    recipe = Recipe(
        model=model,
        tokenizer=validate_tokenizer(top.get("tokenizer"), model, recipe_dir),
        data=data,
        trainer=trainer,
        peft=peft,
        regularizers=validate_regularizers(top.get("regularizers"), trainer, peft),
        output_dir=os.path.abspath(os.path.expanduser(top.get("output_dir") or default_output_dir(recipe_path))),
        resume=top.get("resume", False),
        seed=seed,
        eval_during_training=validate_eval_during_training(top.get("eval_during_training"), recipe_dir, trainer),
        importance=validate_importance(top.get("importance"), recipe_dir, trainer.args.get("deepspeed"), peft),
        path=os.path.abspath(recipe_path) if recipe_path else None,
    )
    if mode is not None:
        mode.check_recipe(recipe)
    check_recipe_data(recipe)  # opens each source's first rows; loads the tokenizer only for chat data
    return recipe


def default_output_dir(recipe_path: str | None) -> str:
    stem = os.path.splitext(os.path.basename(recipe_path))[0] if recipe_path else "recipe"
    return os.path.join("runs", stem)


# -- model and tokenizer ---------------------------------------------------------------------------


def validate_model(section: dict, recipe_dir: str | None, seed: int) -> ModelSpec:
    spec = ModelSpec(**check_mapping(ModelSpec, section, "model"))
    if spec.dtype not in DTYPES:
        raise _choice_error("model.dtype", spec.dtype, DTYPES)
    if sum(x is not None for x in (spec.name_or_path, spec.config, spec.testbed)) != 1:
        raise ConfigError(
            "model: set exactly one of name_or_path (a local path or hub id) or config (a new model) "
            "or testbed (the forgetting testbed's model, e.g. testbed: default)"
        )
    if spec.testbed is not None:
        from llmreg.testbed.build import check_build_options

        with reraise_at_recipe_key("model.testbed", (ValueError,)):
            spec.testbed = check_build_options(spec.testbed)
    elif spec.name_or_path is not None:
        spec.name_or_path = _local_or_hub(spec.name_or_path, recipe_dir, "model.name_or_path")
    else:
        spec.config = validate_model_config(spec.config)
        spec.seed = seed if spec.seed is None else spec.seed
    resolve_gguf_spec(spec, "model")
    return spec


def validate_model_config(config: dict) -> dict:
    """`{size?, model_type?, **fields}`: fields are checked against the architecture's config class."""
    from llmreg.data.tiny import SIZES

    rest = dict(config)
    size, model_type = rest.pop("size", None), rest.pop("model_type", "llama")
    if size is not None and size not in SIZES:
        raise _choice_error("model.config.size", size, SIZES)
    if size is not None and model_type != "llama":
        raise ConfigError(f"model.config: size presets are Llama models; drop size to build a '{model_type}' model")
    config_cls = _config_class(model_type)
    if dataclasses.is_dataclass(config_cls):  # transformers 5 configs are dataclasses; older ones are not checked
        rest = check_mapping(config_cls, rest, "model.config")
    head = {"size": size} if size is not None else {}
    if "model_type" in config:
        head["model_type"] = model_type
    return {**head, **rest}


def _config_class(model_type: str) -> type:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise _choice_error("model.config.model_type", model_type, list(CONFIG_MAPPING.keys()), show=False)
    return CONFIG_MAPPING[model_type]


def validate_tokenizer(section: dict | None, model: ModelSpec, recipe_dir: str | None) -> TokenizerSpec:
    spec = TokenizerSpec(**check_mapping(TokenizerSpec, section or {}, "tokenizer"))
    if spec.builtin is not None and spec.builtin not in BUILTIN_TOKENIZERS:
        raise _choice_error("tokenizer.builtin", spec.builtin, BUILTIN_TOKENIZERS)
    if spec.name_or_path is not None and spec.builtin is not None:
        raise ConfigError("tokenizer: set name_or_path or builtin, not both")
    if spec.name_or_path is not None:
        spec.name_or_path = _local_or_hub(spec.name_or_path, recipe_dir, "tokenizer.name_or_path")
    elif spec.builtin is None:  # the model's own tokenizer, or the built-in one for a new model
        if model.name_or_path is not None:
            spec.name_or_path, spec.gguf_file = model.name_or_path, spec.gguf_file or model.gguf_file
        else:
            spec.builtin = "char"
    resolve_gguf_spec(spec, "tokenizer")
    return spec


def _local_or_hub(value: str, recipe_dir: str | None, where: str) -> str:
    """An existing local path (made absolute) or a hub id (unchanged; checked when it is loaded)."""
    path = resolve_path(value, recipe_dir)
    if os.path.exists(path):
        return path
    if looks_local(value):
        raise ConfigError(f"{where}: path not found: {value} {looked_for(value, recipe_dir)}")
    return value


# -- trainer ---------------------------------------------------------------------------------------


def validate_trainer(section: dict, recipe_dir: str | None, seed: int, has_eval: bool) -> TrainerSpec:
    section = dict(section)
    kind = section.pop("kind", None)
    if kind is None:
        raise ConfigError(f"trainer: missing key 'kind' (one of {', '.join(TRAINER_KINDS)})")
    if kind not in TRAINER_KINDS:
        raise _choice_error("trainer.kind", kind, TRAINER_KINDS)
    reward = _validate_reward(kind, section.pop("reward", None))
    if "output_dir" in section:
        raise ConfigError("trainer.output_dir: set output_dir at the top level of the recipe")
    config_cls = trainer_config_class(kind)
    args = check_mapping(config_cls, section, "trainer")
    _check_enum_strings(config_cls, args)
    check_trainer_ranges(args)
    if args.get("deepspeed") is not None:
        args["deepspeed"] = _validate_deepspeed(args["deepspeed"], recipe_dir)
    if args.get("chat_template_path") is not None:  # an SFTConfig field (TRL)
        args["chat_template_path"] = validate_chat_template_path(args["chat_template_path"], recipe_dir)
    for key, value in TRAINER_DEFAULTS.items():
        args.setdefault(key, value)
    args.setdefault("seed", seed)
    if has_eval and "eval_strategy" not in args:  # evaluate whenever a checkpoint is written
        args["eval_strategy"] = args["save_strategy"]
        args.setdefault("eval_steps", args.get("save_steps", _field_default(config_cls, "save_steps")))
    return TrainerSpec(kind=kind, args=args, reward=reward)


def _validate_reward(kind: str, reward: Any) -> str | None:
    if kind != "grpo":
        if reward is not None:
            raise ConfigError(f"trainer.reward: only trainer kind 'grpo' takes a reward, not '{kind}'")
        return None
    reward = "exact_answer" if reward is None else reward
    if not isinstance(reward, str):
        raise ConfigError(f"trainer.reward: expected a name or 'module:function', got {reward!r}")
    if ":" not in reward and reward not in REWARDS:
        raise _choice_error("trainer.reward", reward, REWARDS)
    return reward


def _check_enum_strings(config_cls: type, args: dict) -> None:
    """Fields typed `SomeEnum | str` accept any string in check_value; the config class would reject a
    misspelt one only when it is built, so check membership here (e.g. lr_scheduler_type, save_strategy)."""
    types = field_types(config_cls)
    for key, value in args.items():
        enums = [a for a in typing.get_args(types[key]) if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):
            choices = [e.value for e in enums[0]]
            if value not in choices:
                raise _choice_error(f"trainer.{key}", value, choices)


def _validate_deepspeed(value: Any, recipe_dir: str | None) -> Any:
    if isinstance(value, str):
        path = resolve_path(value, recipe_dir)
        if not os.path.isfile(path):
            raise ConfigError(f"trainer.deepspeed: file not found: {value} {looked_for(value, recipe_dir)}")
        value = path
    with reraise_at_recipe_key("trainer.deepspeed"):
        check_deepspeed_config(value)  # refuses an `optimizer` block: it would drop llmreg's parameter groups
    return value


def _field_default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# -- peft and regularizers -------------------------------------------------------------------------


def validate_peft(section: dict | None) -> dict | None:
    if section is None:
        return None
    from peft import LoraConfig

    values = check_mapping(LoraConfig, section, "peft")
    values.setdefault("task_type", "CAUSAL_LM")
    with reraise_at_recipe_key("peft", (TypeError, ValueError)):
        LoraConfig(**values)  # its __post_init__ checks combinations of fields
    return values


def validate_regularizers(items: list | None, trainer: TrainerSpec, peft: dict | None) -> list[dict]:
    specs = [_validate_regularizer(item, f"regularizers.{i}") for i, item in enumerate(items or [])]
    from llmreg.core.stack import RegularizerStack

    with reraise_at_recipe_key("regularizers", (ValueError,)):
        stack = RegularizerStack(specs, trainer_kind=trainer.kind)  # checks each one supports this trainer kind
        stack.check_environment(zero_stage=_zero_stage(trainer.args.get("deepspeed")), is_peft=peft is not None)
    return specs


def _validate_regularizer(item: Any, where: str) -> dict:
    from llmreg.core.registry import available, get_regularizer_class

    if isinstance(item, str):  # `regularizers: [l2_sp]` is shorthand for {name: l2_sp}
        item = {"name": item}
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping with 'name', got {item!r}")
    if "name" not in item:
        raise ConfigError(f"{where}: missing key 'name' (registered: {', '.join(available())})")
    with reraise_at_recipe_key(where):
        cls = get_regularizer_class(item["name"])
    options = check_mapping(cls.options_cls, {k: v for k, v in item.items() if k != "name"}, where)
    return {"name": item["name"], **options}


# -- eval during training --------------------------------------------------------------------------


def validate_eval_during_training(
    section: dict | None, recipe_dir: str | None, trainer: TrainerSpec
) -> EvalDuringTrainingSpec | None:
    """The suite must exist and load (its tasks and their data files are checked); steps and limit >= 1;
    ZeRO-3 is refused here rather than at train begin (rank 0 cannot evaluate partitioned weights)."""
    if section is None:
        return None
    where = "eval_during_training"
    values = check_mapping(EvalDuringTrainingSpec, section, where)
    if "suite" not in values:
        raise ConfigError(f"{where}: missing key 'suite' (a suite file, e.g. eval/suites/stories260k.yaml)")
    spec = EvalDuringTrainingSpec(**values)
    for key in ("every_steps", "limit", "batch_size"):
        value = getattr(spec, key)
        if value is not None and value < 1:
            raise ConfigError(f"{where}.{key}: must be >= 1, got {value}")
    path = resolve_path(spec.suite, recipe_dir)
    if not os.path.isfile(path):
        raise ConfigError(f"{where}.suite: suite file not found: {spec.suite} {looked_for(spec.suite, recipe_dir)}")
    from llmreg.eval.suite import load_suite

    with reraise_at_recipe_key(f"{where}.suite"):
        load_suite(path)
    spec.suite = path
    max_steps = trainer.args.get("max_steps", -1)
    if isinstance(max_steps, int) and 0 < max_steps < spec.every_steps:
        warn_recipe(
            f"{where}.every_steps={spec.every_steps} is larger than trainer.max_steps={max_steps}: "
            "the suite would never run during training; lower every_steps"
        )
    if _zero_stage(trainer.args.get("deepspeed")) == 3:
        raise ConfigError(
            f"{where}: not supported with DeepSpeed ZeRO-3 (rank 0 cannot evaluate partitioned "
            "weights); use ZeRO-2 or evaluate checkpoints afterwards with `llmreg eval`"
        )
    return spec


def _zero_stage(deepspeed: Any) -> int:
    cfg = load_deepspeed_config(deepspeed) or {}
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    return stage if isinstance(stage, int) else 0


def _choice_error(where: str, value: Any, choices: Any, show: bool = True) -> ConfigError:
    choices = list(choices)
    hint = closest(str(value), [str(c) for c in choices])
    msg = f"{where}: unknown value {value!r}"
    if hint:
        msg += f"; did you mean '{hint}'?"
    if show:
        msg += f" (one of {', '.join(str(c) for c in choices)})"
    return ConfigError(msg)


__all__ = ["DEFAULT_SEED", "REWARDS", "check_top_level", "default_output_dir", "validate_run_recipe"]
