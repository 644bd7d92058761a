"""What the tensors of a decoder layer are, for every architecture family (issue 16): attention, FFN, norm,
q/k-norm, router and expert tensors; fused projections; the weight layout (GPT-2's Conv1D stores [in, out]);
embedding scaling (Gemma's `embed_scale`, Granite's `embedding_multiplier`).

Derived from the modules, not from a list of model types:
- a decoder layer's direct children are blocks: a class name with "Attention" is the attention block, one with
  "MLP", "Moe"/"MoE", "FeedForward" or "Experts" the FFN block (`BLOCK_NAMES` names the usual attribute names
  for classes that say neither);
- a module whose class name holds "Norm" (RMSNorm, LayerNorm) is a norm; inside the attention block it is a
  q/k norm (Qwen3, Gemma 3, OLMo 2);
- a module holding 3-D parameters is an expert stack ([experts, out, in], or [experts, in, out] when its
  `is_transposed` says so); each 3-D tensor is one member (PEFT and half_ft treat them one by one);
- the other parameter-holding module of an MoE block (the block holds an expert stack) is its router;
- `nn.Linear` and transformers' `Conv1D` (by class name: no transformers import) are projections.
The one explicit table is `FUSED`: which projection names pack several (q, k, v / gate, up) into one tensor.

A new family needs nothing here when its classes follow these names; otherwise add its block attribute names
to `BLOCK_NAMES` or a fused name to `FUSED` (docs/architecture.md, "The model anatomy layer").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llmreg.core.anatomy import decoder_layers, unwrap
from llmreg.core.options import ConfigError

ATTENTION, FFN, NORMS, QK_NORMS, ROUTER = "attention", "ffn", "norms", "qk_norms", "router"
CATEGORIES = (ATTENTION, FFN, NORMS, QK_NORMS, ROUTER)  # the order half_ft draws them in

# projections that pack several of the paper's matrices into one tensor: name -> what it packs
FUSED = {
    "qkv_proj": ("q", "k", "v"),  # Phi-3
    "query_key_value": ("q", "k", "v"),  # GPT-NeoX, Falcon, Bloom
    "c_attn": ("q", "k", "v"),  # GPT-2 (Conv1D)
    "Wqkv": ("q", "k", "v"),  # MPT
    "gate_up_proj": ("gate", "up"),  # Phi-3, and the expert stacks of Mixtral / Qwen3-MoE
}
# block attribute names for block classes whose names say neither Attention nor MLP
BLOCK_NAMES = {
    "self_attn": ATTENTION,
    "attn": ATTENTION,
    "attention": ATTENTION,
    "self_attention": ATTENTION,
    "mlp": FFN,
    "feed_forward": FFN,
    "block_sparse_moe": FFN,
    "ffn": FFN,
}
_FFN_WORDS = ("MLP", "Moe", "MoE", "FeedForward", "Experts")
_PEFT_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclass(frozen=True)
class Member:
    """One unit of a decoder layer: a module (its weight and bias) or one 3-D expert tensor."""

    path: str  # inside the layer: "self_attn.q_proj", or "mlp.experts.gate_up_proj" for an expert tensor
    category: str  # ATTENTION | FFN | NORMS | QK_NORMS | ROUTER
    kind: str  # "linear" | "conv1d" | "norm" | "experts" | "router"
    params: tuple[str, ...]  # parameter names inside the layer ("self_attn.q_proj.weight", ...)
    fuses: tuple[str, ...] = ()  # FUSED's entry for a fused projection


def is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2): a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D"


def is_projection(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def is_norm(module: torch.nn.Module) -> bool:
    return "Norm" in type(module).__name__


def is_expert_stack(module: torch.nn.Module) -> bool:
    """A module holding 3-D parameters: one [experts, ., .] tensor per projection (Mixtral, Qwen3-MoE)."""
    return any(p.dim() == 3 or len(getattr(p, "ds_shape", ())) == 3 for p in module.parameters(recurse=False))


def weight_layout(module: torch.nn.Module) -> str:
    """ "out_in" (nn.Linear, routers), "in_out" (Conv1D), "experts_out_in" or "experts_in_out" (expert stacks)."""
    if is_expert_stack(module):
        return "experts_in_out" if getattr(module, "is_transposed", False) else "experts_out_in"
    return "in_out" if is_conv1d(module) else "out_in"


def block_category(name: str, module: torch.nn.Module) -> str | None:
    cls = type(module).__name__
    if "Attention" in cls:
        return ATTENTION
    if any(word in cls for word in _FFN_WORDS):
        return FFN
    return BLOCK_NAMES.get(name)


def layer_members(layer: torch.nn.Module, where: str = "llmreg") -> list[Member]:
    """The members of one decoder layer, in module order; ConfigError naming the first parameter-holding module
    that none of the rules places. Under PEFT the adapters are skipped and member paths are the plain model's
    (`.base_layer` removed); `params` are the names as the given layer spells them."""
    blocks = {name: block_category(name, child) for name, child in layer.named_children()}
    moe_blocks = {_plain(n).rpartition(".")[0] for n, m in layer.named_modules() if is_expert_stack(m)}
    members: list[Member] = []
    for path, module in layer.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if not own or any(part in _PEFT_PARTS for part in path.split(".")):
            continue
        plain = _plain(path)
        block = blocks.get(plain.split(".")[0])
        params = tuple(f"{path}.{n}" if path else n for n in own)
        if is_expert_stack(module):
            members.extend(_expert_members(module, path, plain))
        elif is_norm(module):
            category = QK_NORMS if block == ATTENTION and "." in plain else NORMS
            members.append(Member(plain, category, "norm", params))
        elif plain.rpartition(".")[0] in moe_blocks:
            members.append(Member(plain, ROUTER, "router", params))
        elif is_projection(module) and block in (ATTENTION, FFN):
            kind = "conv1d" if is_conv1d(module) else "linear"
            members.append(Member(plain, block, kind, params, FUSED.get(plain.rpartition(".")[2], ())))
        else:
            raise ConfigError(
                f"{where}: cannot tell what '{plain}' ({type(module).__name__}) of a decoder layer is (attention, FFN, "
                "norm, router or experts); see llmreg/core/families.py"
            )
    return members


def _plain(path: str) -> str:
    return re.sub(r"\.base_layer(?=\.|$)", "", path)  # PEFT's wrappers (nested for MoE expert tensors)


def _expert_members(module: torch.nn.Module, path: str, plain: str) -> list[Member]:
    """One member per 3-D tensor; a bias tensor (`gate_up_proj_bias`) joins the tensor its name starts with."""
    named = dict(module.named_parameters(recurse=False))
    stacks = [n for n, p in named.items() if len(getattr(p, "ds_shape", p.shape)) == 3]
    extra = [n for n in named if n not in stacks]
    members = []
    for stack in stacks:
        mine = [stack] + [n for n in extra if n.startswith(stack)]
        params = tuple(f"{path}.{n}" for n in mine)
        members.append(Member(f"{plain}.{stack}", FFN, "experts", params, FUSED.get(stack, ())))
    claimed = {n for m in members for n in m.params}
    left = [n for n in named if f"{path}.{n}" not in claimed]
    if left:
        raise ConfigError(f"llmreg: expert tensor(s) {left} of '{path}' belong to no 3-D expert tensor")
    return members


def model_members(model: torch.nn.Module, where: str = "llmreg") -> list[tuple[str, list[Member]]]:
    """(layer module name, members) of every decoder layer of the plain model, in depth order."""
    return [(name, layer_members(layer, where)) for name, layer in decoder_layers(model, where)]


def moe_parts(model: torch.nn.Module) -> dict[str, list[str]]:
    """Module paths (plain model names) of the expert stacks and routers: {"experts": [...], "router": [...]}.
    Needs no full classification of the layers (a module `layer_members` cannot place does not matter here)."""
    out: dict[str, list[str]] = {"experts": [], "router": []}
    try:
        layers = decoder_layers(model)
    except ConfigError:  # no (unambiguous) decoder layers: no MoE layers either
        return out
    for layer_name, layer in layers:
        modules = [(_plain(n), m) for n, m in layer.named_modules() if not set(n.split(".")) & set(_PEFT_PARTS)]
        stacks = list(dict.fromkeys(p for p, m in modules if is_expert_stack(m)))
        blocks = {p.rpartition(".")[0] for p in stacks}
        out["experts"] += [f"{layer_name}.{p}" for p in stacks]
        for path, m in modules:
            own = any(True for _ in m.parameters(recurse=False))
            if own and path not in stacks and not is_norm(m) and path.rpartition(".")[0] in blocks:
                out["router"].append(f"{layer_name}.{path}")
    out["router"] = list(dict.fromkeys(out["router"]))
    return out


def embedding_scale(embedding: torch.nn.Module) -> torch.Tensor | float | None:
    """The factor an input-embedding module applies inside its own forward (Gemma's `embed_scale`,
    sqrt(hidden)), or None. A module that replaces the embedding's forward must apply it too."""
    scale = getattr(embedding, "embed_scale", None)
    return scale if isinstance(scale, (torch.Tensor, float, int)) else None


def embedding_multiplier(model: torch.nn.Module) -> float:
    """The factor the model's forward applies to the embedding output outside the embedding module
    (Granite's `config.embedding_multiplier`; 1 elsewhere)."""
    config = getattr(unwrap(model), "config", None)
    return float(getattr(config, "embedding_multiplier", 1.0) or 1.0)
