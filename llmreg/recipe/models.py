"""Tokenizer and model of a recipe: pretrained (`name_or_path`), built from config, or the forgetting testbed's.

`model: {testbed: default}` (or a mapping of build options, e.g. `{size: tiny, steps: 20}`)
is the model `llmreg.testbed.build` makes: loaded from its cache, or pre-trained first
(about 5.5 min on one CPU thread for the default). Its tokenizer is the built-in character
tokenizer, which validation picks for it as for any model without a `name_or_path`.

A from-config model takes its vocabulary size and special-token ids from the
tokenizer unless the recipe sets them, and is initialised from `model.seed`,
so every rank (and every rerun) starts from the same weights.

DPO (without PEFT) and GRPO with `beta > 0` rebuild their reference model from
`config._name_or_path` (docs/architecture.md, trap 11), which a model that was never saved
does not have. For those, a from-config model is first written to
`<output_dir>/init` and loaded from there, so the reference is the same start.
"""

from __future__ import annotations

import json
import os

import torch

from llmreg.core.options import ConfigError
from llmreg.recipe.errors import reraise_at_recipe_key
from llmreg.recipe.gguf import MODEL_PARTS, check_gguf, converted_folder, is_gguf_path, split_gguf_path
from llmreg.recipe.paths import looks_local
from llmreg.recipe.schema import ModelSpec, Recipe, TokenizerSpec

INIT_DIR = "init"
# a model folder whose config.json carries this key must be converted before transformers loads it as it was
# trained (e.g. learnable multipliers: `llmreg export`); the value is the reason and what to do, written after
# "<folder> ", with {path} standing for the folder (llmreg.regularizers.multipliers.export writes one)
UNEXPORTED_KEY = "llmreg_unexported"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tokenizer(spec: TokenizerSpec):
    if spec.builtin == "char":
        from llmreg.data import build_char_tokenizer

        return build_char_tokenizer(spec.model_max_length or 512)
    from transformers import AutoTokenizer

    path = spec.name_or_path
    if spec.gguf_file is not None:
        path = converted_folder(spec.name_or_path, spec.gguf_file, ("tokenizer",))
    with reraise_at_recipe_key("tokenizer.name_or_path", (OSError, ValueError)):
        tok = AutoTokenizer.from_pretrained(path)
    if spec.model_max_length:
        tok.model_max_length = spec.model_max_length
    if tok.pad_token is None:  # collators pad; many causal-LM tokenizers ship without a pad token
        tok.pad_token = tok.eos_token
    return tok


def refuse_unexported(path: str, where: str) -> None:
    """A ConfigError `<where>: <path> <reason>` when `path` is a model folder marked with UNEXPORTED_KEY."""
    config = os.path.join(str(path), "config.json")
    if not os.path.isfile(config):
        return
    with open(config) as f:
        note = json.load(f).get(UNEXPORTED_KEY)
    if note is not None:
        raise ConfigError(f"{where}: {path} {str(note).replace('{path}', str(path))}")


def check_model_path(path: str, where: str = "eval") -> None:
    """A path that exists must be a model folder (and not one marked unexported); one that does not is an error
    offline (no hub) or when it is written as a path (./x, /x, a/b/c), since hub names are at most `org/name`.
    A `DIR/NAME.gguf` path needs the file and the gguf package (llmreg.recipe.gguf)."""
    if is_gguf_path(path):
        check_gguf(*split_gguf_path(path), where)
        return
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{where}: {path} is not a model folder (no config.json)")
        refuse_unexported(path, where)
        return
    if os.environ.get("HF_HUB_OFFLINE") or looks_local(path):
        raise ConfigError(f"{where}: model path not found: {path} (looked for {os.path.abspath(path)})")


def model_config(spec: ModelSpec, tokenizer):
    """The transformers config of a from-config model."""
    from transformers import AutoConfig

    from llmreg.data import tiny_llama_config

    fields = dict(spec.config)
    size, model_type = fields.pop("size", None), fields.pop("model_type", "llama")
    from_tokenizer = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    for key, value in from_tokenizer.items():
        if value is not None:
            fields.setdefault(key, value)
    if fields["vocab_size"] < len(tokenizer):
        raise ConfigError(
            f"model.config.vocab_size: {fields['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )
    with reraise_at_recipe_key("model.config", (TypeError, ValueError)):
        if size is not None:
            return tiny_llama_config(size, **fields)
        return AutoConfig.for_model(model_type, **fields)


def build_model(recipe: Recipe, tokenizer, args):
    from transformers import AutoModelForCausalLM

    spec = recipe.model
    dtype = _DTYPES.get(spec.dtype)
    if spec.testbed is not None:
        model = AutoModelForCausalLM.from_pretrained(testbed_path(spec, args), dtype=dtype or "auto")
        # testbed answers end with a newline: generation (GRPO rollouts) stops there, as the testbed's own scoring
        newline = tokenizer.convert_tokens_to_ids("\n")
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, newline]
        return model
    if spec.gguf_file is not None:  # the de-quantised copy in the GGUF cache (convert_gguf wrote it)
        return AutoModelForCausalLM.from_pretrained(
            converted_folder(spec.name_or_path, spec.gguf_file), dtype=dtype or torch.float32
        )
    if spec.name_or_path is not None:
        refuse_unexported(spec.name_or_path, "model.name_or_path")
        with reraise_at_recipe_key("model.name_or_path", (OSError, ValueError)):
            return AutoModelForCausalLM.from_pretrained(spec.name_or_path, dtype=dtype or "auto")
    config = model_config(spec, tokenizer)
    if needs_saved_reference(recipe, args):
        return _load_saved_init(recipe, config, dtype, args)
    torch.manual_seed(spec.seed)
    # from_config, not the model class: under ZeRO-3 it builds the model inside deepspeed.zero.Init
    return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)


def convert_gguf(recipe: Recipe, args) -> None:
    """De-quantise the recipe's GGUF files into the cache (llmreg.recipe.gguf) on the main process first; the
    other ranks wait, then find the cache. Before the tokenizer loads, so no rank converts on its own."""
    pairs = ((recipe.model, MODEL_PARTS), (recipe.tokenizer, ("tokenizer",)))
    todo = [(spec, parts) for spec, parts in pairs if spec.gguf_file is not None]
    if not todo:
        return
    with args.main_process_first(desc="convert the GGUF checkpoint"):
        for spec, parts in todo:
            converted_folder(spec.name_or_path, spec.gguf_file, parts)


def testbed_path(spec: ModelSpec, args) -> str:
    """The testbed build's folder, built first if it is not in the cache (once: other ranks wait, then load it)."""
    from llmreg.testbed import build

    with args.main_process_first(desc="build the testbed"):
        return str(build(**spec.testbed))


def needs_saved_reference(recipe: Recipe, args) -> bool:
    """True when TRL will rebuild a reference model from the policy's `_name_or_path`."""
    kind = recipe.trainer.kind
    if kind == "dpo":
        return recipe.peft is None and not args.precompute_ref_log_probs
    return kind == "grpo" and args.beta != 0.0


def _load_saved_init(recipe: Recipe, config, dtype, args):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    init_dir = os.path.join(recipe.output_dir, INIT_DIR)
    with args.main_process_first(desc="save the initial model"):
        if not os.path.isfile(os.path.join(init_dir, "config.json")):  # a resumed run reuses the same start
            torch.manual_seed(recipe.model.seed)
            # the model class itself, not from_config: outside zero.Init, so the saved weights are whole
            MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).save_pretrained(init_dir)
    return AutoModelForCausalLM.from_pretrained(init_dir, dtype=dtype or torch.float32)
