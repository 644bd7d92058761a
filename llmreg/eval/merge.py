"""`llmreg merge`: interpolate a fine-tuned model back toward its base (WiSE-FT, Wortsman et al., arXiv 2109.01903).

For each alpha, theta = (1 - alpha) * base + alpha * tuned, element-wise over every floating-point tensor of the
state dict (computed in fp32, stored in the tuned model's dtype), written as a plain Hugging Face model folder
`<out>/alpha-<alpha>/` with the tokenizer (the tuned model's, else the base's) and `llmreg_merge.json` (base,
tuned, alpha). alpha = 0 is the base, 1 the fine-tuned model; values outside [0, 1] extrapolate.

`--tuned` is a run's output_dir (its `final/` is used) or a model folder; `--base` a model folder, a hub name, or
a GGUF file `DIR/NAME.gguf` (its de-quantised copy, llmreg.recipe.gguf). A PEFT adapter (a folder with
`adapter_config.json`) is merged into the base first with PEFT's own `merge_and_unload`, and the merged model is
interpolated like a full fine-tune. That is exact for every adapter type (LoRA, DoRA, modules_to_save); for LoRA
it equals merging the adapter with its scaling multiplied by alpha, base + alpha * (B A) * scaling, since the
interpolation is linear in the weight delta (tests/test_merge.py checks this).

Mismatched models are refused with a one-line ConfigError: the configs are compared first (architecture, then the
fields that set tensor shapes) before any weights load, then the state dicts' names and shapes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from llmreg.core.options import ConfigError

FINAL_DIR = "final"
ADAPTER_CONFIG = "adapter_config.json"
MERGE_FILE = "llmreg_merge.json"
ARCHITECTURE_KEYS = ("model_type", "architectures")
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


@dataclass
class MergePlan:
    base: str  # a model folder or hub name (a GGUF stays `DIR/NAME.gguf` until it loads)
    tuned: str  # a model folder or an adapter folder
    adapter: bool
    alphas: list[float]
    out: str

    def folder(self, alpha: float) -> str:
        return os.path.join(self.out, f"alpha-{alpha:g}")


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(a) for a in str(text).split(",") if a.strip()]
    except ValueError:
        raise ConfigError(
            f"merge: --alpha takes numbers separated by commas, e.g. 0.25,0.5,0.75; got {text!r}"
        ) from None
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise ConfigError(f"merge: --alpha takes finite numbers separated by commas, e.g. 0.25,0.5; got {text!r}")
    return sorted(set(alphas))


def model_folder(path: str, where: str) -> str:
    """A run's output_dir -> its final/; a model or adapter folder as it is; checked before anything loads."""
    from llmreg.recipe.gguf import check_gguf, is_gguf_path, split_gguf_path
    from llmreg.recipe.models import check_model_path

    if is_gguf_path(path):
        check_gguf(*split_gguf_path(path), f"merge {where}")
        return os.path.abspath(path)
    final = os.path.join(str(path), FINAL_DIR)
    if os.path.isdir(final):
        path = final
    if os.path.isfile(os.path.join(str(path), ADAPTER_CONFIG)):
        return os.path.abspath(path)
    check_model_path(str(path), f"merge {where}")
    return os.path.abspath(path) if os.path.exists(path) else str(path)


def plan_merge(base: str, tuned: str, alphas: str, out: str, overwrite: bool = False) -> MergePlan:
    """Resolve and check everything before a weight loads: paths, alphas, configs, existing outputs."""
    plan = MergePlan(
        base=model_folder(base, "--base"),
        tuned=model_folder(tuned, "--tuned"),
        adapter=False,
        alphas=parse_alphas(alphas),
        out=os.path.abspath(out),
    )
    plan.adapter = os.path.isfile(os.path.join(plan.tuned, ADAPTER_CONFIG))
    if plan.adapter:
        from llmreg.recipe.gguf import is_gguf_path

        with open(os.path.join(plan.tuned, ADAPTER_CONFIG)) as f:
            recorded = json.load(f).get("base_model_name_or_path")
        if recorded and not is_gguf_path(recorded) and os.path.isfile(os.path.join(recorded, "config.json")):
            check_configs(_config(plan.base), _config(recorded), plan.base, f"{plan.tuned} (base {recorded})")
    else:
        check_configs(_config(plan.base), _config(plan.tuned), plan.base, plan.tuned)
    taken = [plan.folder(a) for a in plan.alphas if os.path.isdir(plan.folder(a)) and os.listdir(plan.folder(a))]
    if taken and not overwrite:
        raise ConfigError(f"merge: {taken[0]} exists already; add --overwrite to replace it")
    return plan


def _config(path: str) -> dict:
    from transformers import AutoConfig

    from llmreg.recipe.gguf import cache_folder, is_cached, is_gguf_path, split_gguf_path

    if is_gguf_path(path):  # the converted copy's config, else the file's header (nothing is de-quantised yet)
        if is_cached(path, ("model",)):
            path = cache_folder(path)
        else:
            folder, name = split_gguf_path(path)
            return AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    try:
        return AutoConfig.from_pretrained(path).to_dict()
    except (OSError, ValueError) as err:
        raise ConfigError(f"merge: cannot read the config of {path}: {str(err).splitlines()[0]}") from None


def check_configs(base: dict, tuned: dict, base_name: str, tuned_name: str) -> None:
    for key in ARCHITECTURE_KEYS:  # a GGUF header's config has no `architectures`: compared where both have it
        if None not in (base.get(key), tuned.get(key)) and base[key] != tuned[key]:
            raise ConfigError(
                f"merge: different architectures: {key} {tuned.get(key)!r} of {tuned_name} != "
                f"{base.get(key)!r} of {base_name}; only fine-tunes of the base merge with it"
            )
    for key in SHAPE_KEYS:
        if key in base and key in tuned and base[key] != tuned[key]:
            raise ConfigError(
                f"merge: {key} {tuned[key]} of {tuned_name} != {base[key]} of {base_name}; the shapes differ"
            )


def interpolate(base_sd: dict, tuned_sd: dict, alpha: float) -> dict:
    """(1 - alpha) * base + alpha * tuned per floating-point tensor, in fp32, cast to the tuned tensor's dtype;
    other tensors (integer buffers) are the tuned model's."""
    out = {}
    for name, tuned in tuned_sd.items():
        if not tuned.is_floating_point():
            out[name] = tuned.clone()
            continue
        mixed = (1.0 - alpha) * base_sd[name].float() + alpha * tuned.float()
        out[name] = mixed.to(tuned.dtype)
    return out


def check_state_dicts(base_sd: dict, tuned_sd: dict, plan: MergePlan) -> None:
    missing = sorted(set(base_sd) ^ set(tuned_sd))
    if missing:
        raise ConfigError(f"merge: {plan.tuned} and {plan.base} differ in parameters, e.g. {missing[0]}")
    for name, tensor in tuned_sd.items():
        if tensor.shape != base_sd[name].shape:
            raise ConfigError(
                f"merge: {name} has shape {tuple(tensor.shape)} in {plan.tuned} and "
                f"{tuple(base_sd[name].shape)} in {plan.base}"
            )


def load_pair(plan: MergePlan):
    """(base model, tuned model, tokenizer source): the tuned model with any adapter merged in (PEFT)."""
    from transformers import AutoModelForCausalLM

    from llmreg.recipe.gguf import gguf_model_folder

    base_path = gguf_model_folder(plan.base)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    if plan.adapter:
        from peft import PeftModel

        carrier = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
        try:
            tuned = PeftModel.from_pretrained(carrier, plan.tuned).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(
                f"merge: the adapter {plan.tuned} does not fit {plan.base}: {str(err).splitlines()[0]}"
            ) from None
    else:
        tuned = AutoModelForCausalLM.from_pretrained(plan.tuned, dtype="auto")
    has_tokenizer = any(
        os.path.isfile(os.path.join(plan.tuned, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    )
    return base, tuned, plan.tuned if has_tokenizer else base_path


def merge(plan: MergePlan) -> list[str]:
    """Write one model folder per alpha; the folders written."""
    from transformers import AutoTokenizer

    base, tuned, tokenizer_source = load_pair(plan)
    base_sd = {k: v.detach() for k, v in base.state_dict().items()}
    tuned_sd = {k: v.detach().clone() for k, v in tuned.state_dict().items()}
    check_state_dicts(base_sd, tuned_sd, plan)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    written = []
    for alpha in plan.alphas:
        folder = plan.folder(alpha)
        tuned.load_state_dict(interpolate(base_sd, tuned_sd, alpha), strict=True)
        tuned.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, MERGE_FILE), "w") as f:
            json.dump({"base": plan.base, "tuned": plan.tuned, "adapter": plan.adapter, "alpha": alpha}, f, indent=2)
        written.append(folder)
    return written
