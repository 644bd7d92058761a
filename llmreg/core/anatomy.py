"""Where things are in a Hugging Face causal LM: decoder layers, the layer index of a tensor name, shapes under
ZeRO-3, PEFT wrapping, the label ignore index.

Torch only: PEFT and DeepSpeed are recognised by duck typing (or imported inside a function), so the core stays
importable without them. Every regularizer asks these questions here instead of keeping its own copy.
"""

from __future__ import annotations

import re

import torch

from llmreg.core.options import ConfigError

IGNORE_INDEX = -100  # labels the causal-LM loss skips (transformers' and TRL's convention)

# decoder-layer containers of the usual HF architectures: Llama/Mistral/Qwen `layers.N`, GPT-2 `h.N`,
# GPT-NeoX `layers.N`, T5/BERT-style `layer.N`, MPT `blocks.N`
LAYER_CONTAINERS = ("layers", "h", "blocks", "layer")
# a tensor or module *inside* decoder layer N (`model.layers.3.mlp.up_proj.weight`)
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
# a decoder layer module itself (`model.layers.3`)
LAYER_MODULE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)$")
OUTSIDE_LAYERS = "other"  # the layer key of a tensor outside the decoder layers (embeddings, head, final norm)


def layer_index(name: str) -> int | None:
    """The decoder-layer index of a parameter or submodule name, or None outside the decoder layers."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def layer_key(name: str) -> str:
    """`layer_index` as a string key, or "other"."""
    index = layer_index(name)
    return OUTSIDE_LAYERS if index is None else str(index)


def full_shape(p: torch.Tensor) -> torch.Size:
    """The parameter's shape, also when ZeRO-3 has partitioned it into a placeholder (`ds_shape`)."""
    return getattr(p, "ds_shape", p.shape)


def is_peft(model: torch.nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel` (False when PEFT is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def base_name(name: str) -> str:
    """The plain model's name of a parameter seen through PEFT (`base_model.model.` prefix, `.base_layer`)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    # nested wrappers (PEFT's ParamWrapper around a ParamWrapper: MoE experts) repeat `.base_layer`
    return re.sub(r"(?:\.base_layer)+(?=\.)", "", name)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain HF model under DeepSpeed / DDP (`.module`) and PEFT (`get_base_model`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def is_deepspeed_engine(model: object) -> bool:
    """Whether `model` is a DeepSpeed engine (checked by class name: no DeepSpeed import)."""
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def decoder(model: torch.nn.Module, where: str = "llmreg") -> torch.nn.Module:
    """The decoder body (embeddings + layers + final norm, no LM head) whose output is the final hidden state."""
    plain = unwrap(model)
    get = getattr(plain, "get_decoder", None)
    body = get() if callable(get) else None
    if body is None:
        body = getattr(plain, getattr(plain, "base_model_prefix", "model"), None)
    if not isinstance(body, torch.nn.Module) or body is plain:
        raise ConfigError(f"{where}: cannot find the decoder body of {type(plain).__name__}")
    return body


def decoder_layers(model: torch.nn.Module, where: str = "llmreg") -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every decoder layer, in depth order, as `named_modules()` of the plain model names them."""
    found = [(name, m) for name, m in unwrap(model).named_modules() if LAYER_MODULE.search(name)]
    if not found:
        raise ConfigError(f"{where}: the model has no decoder layers (no module named like 'layers.<i>')")
    parents = {name.rsplit(".", 1)[0] if "." in name else "" for name, _ in found}
    if len(parents) > 1:
        raise ConfigError(
            f"{where}: decoder layers found in several containers {sorted(parents)}; "
            "restrict them with `layers` (a regex on the layer module names)"
        )
    return sorted(found, key=lambda item: int(LAYER_MODULE.search(item[0]).group(1)))


def layer_list(body: torch.nn.Module, where: str = "llmreg") -> list[torch.nn.Module]:
    """The decoder layers held by a decoder body (`body.layers`, `body.h`, ...), in order."""
    for name in LAYER_CONTAINERS:
        layers = getattr(body, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    raise ConfigError(f"{where}: {type(body).__name__} has no decoder-layer list ({', '.join(LAYER_CONTAINERS)})")


def final_hidden(output: object) -> torch.Tensor:
    """The last hidden state of a decoder body's output (a ModelOutput or a tuple)."""
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def label_token_count(batch: dict) -> float:
    """Tokens a causal-LM loss averages over: shifted labels != IGNORE_INDEX (1 without labels)."""
    labels = batch.get("labels")
    if not torch.is_tensor(labels):
        return 1.0
    return float(max(int((labels[..., 1:] != IGNORE_INDEX).sum()), 1))
