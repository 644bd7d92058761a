"""Half Fine-Tuning: freeze a random, category-balanced half of every decoder layer.

Paper: Hui et al., "HFT: Half Fine-Tuning for Large Language Models", arXiv 2404.18466 (ACL 2025).
No official code is public; spec: ../shared/methods/hft.md.

Rule (per decoder layer, per `nn.Parameter`; biases follow their matrix), for every architecture family the
model anatomy layer (`llmreg.core.families`) knows:
    attention  freeze half of the attention projections (2 of {q, k, v, o})
    FFN        freeze half of the FFN matrices: 2 of {gate, up, down} in a random floor(L/2) of the layers,
               1 of 3 in the others; an MoE block's expert tensors are its FFN matrices
    norms      freeze half of the block norms (1 of {input norm, post-attention norm}; 2 of Gemma 2/3's 4)
    qk_norms   Qwen3 / Gemma 3 / OLMo 2 q_norm and k_norm: their own category, 1 of 2
    router     an MoE block's router: its own category of one member, frozen in floor(L/2) of the layers
A category of n members freezes n/2 of them; for odd n a random floor(L/2) of the layers round up (the paper's
FFN rule). Embeddings, LM head and the final norm stay trainable. The draw is seeded by (seed, stage), so every
rank draws the same set (checked by all-gathering a hash) and each stage of a multi-stage recipe draws
a new one. On Llama / Mistral / Qwen2 the draw is the one of the paper's table, member for member.

Fused projections (Phi-3 `qkv_proj` / `gate_up_proj`, GPT-NeoX / Falcon `query_key_value`, GPT-2 `c_attn`, the
experts' `gate_up_proj`) are ONE member, not split into q/k/v or gate/up: freezing works per `nn.Parameter`
(`requires_grad=False` before the optimizer and the engine exist, so a frozen tensor has no gradient, no
optimizer state and no master copy, trap 5); a split would freeze rows of a tensor through a gradient mask and
keep its whole optimizer state, losing what freezing saves. So Phi-3 freezes 1 of {qkv_proj, o_proj} and 1 of
{gate_up_proj, down_proj}; `balance: params` then picks among the subsets closest to half the parameters, and
for such an unequal pair freezes the larger member in a random half of the layers and the smaller in the others
(the paper's cross-layer FFN rule, applied to a pair no single layer can halve), so the decoder is half frozen.

Hooks: `setup` only: `requires_grad=False` before the optimizer and the DeepSpeed engine exist, so frozen
tensors get no gradient, no optimizer state and no fp32 master copy (docs/architecture.md, trap 5). The frozen set is
the regularizer's state: saved with every checkpoint and, on resume, loaded back *before* the optimizer
is built (`loads_state_early`), never re-drawn.

Departures from / additions to the paper:
- The general category rule is "freeze n/2 of n members"; when n is odd (the 3-matrix FFN) the layers
  alternate between ceil and floor as the paper does for the FFN. That also covers 2-matrix MLPs (1 of 2),
  4-norm blocks such as Gemma 2/3 (2 of 4), q/k norms, routers and experts, which the paper does not define
  (experimental).
- `balance="params"` (package option, for GQA models): draw uniformly among the subsets of a category
  whose parameter count is closest to the count rule's share of that category's parameters.
- The final norm stays trainable (the paper does not say).
- Only `hft_resample="stage"`, `granularity="category"` and ratio 0.5 are offered; the per-epoch
  re-draw would need a new optimizer and engine per epoch.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

import llmreg.core.dist as dist
from llmreg.core.anatomy import LAYER_PATTERN, full_shape
from llmreg.core.families import CATEGORIES, model_members
from llmreg.core.options import ConfigError
from llmreg.core.registry import register
from llmreg.core.regularizer import Order, Regularizer, Requirements, option

logger = logging.getLogger(__name__)

# Llama / Mistral / Qwen2 module names per category (what the anatomy layer finds there; tests and users' reference)
LLAMA_CATEGORIES: dict[str, list[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "ffn": ["gate_proj", "up_proj", "down_proj"],
    "norms": ["input_layernorm", "post_attention_layernorm"],
}
# embedding and output-head names of the usual HF architectures
EMBEDDING_PATTERN = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head|wte|wpe|embed_out|word_embeddings)\.")


# -- pure functions ------------------------------------------------------------------------------------


def group_layers(
    names: list[str],
    categories: dict[str, list[str]],
) -> list[dict[str, dict[str, list[str]]]]:
    """Per decoder layer (in index order): {category: {member: [parameter names]}}.

    A member is a module name (`q_proj`) or a dotted path inside the layer (`attn.c_proj`, where a
    bare name would be ambiguous). Every parameter inside a decoder layer must belong to exactly one
    member; a layer that lacks a member, or holds a parameter no member claims, is an error naming it.
    """
    member_of: dict[str, tuple[str, str]] = {}
    for cat, members in categories.items():
        for m in members:
            if m in member_of:
                raise ConfigError(f"half_ft: module name '{m}' is listed in categories '{member_of[m][0]}' and '{cat}'")
            member_of[m] = (cat, m)
    layers: dict[int, dict[str, dict[str, list[str]]]] = {}
    for name in names:
        match = LAYER_PATTERN.search(name)
        if not match:
            continue
        index = int(match.group(1))
        path = "." + ".".join(name[match.end() :].split(".")[:-1]) + "."  # module path inside the layer
        hits = [hit for m, hit in member_of.items() if f".{m}." in path]
        if len(hits) != 1:
            raise ConfigError(
                f"half_ft: cannot classify '{name}' into one of the categories {_describe(categories)}; "
                "pass `categories` mapping each category to this architecture's module names"
            )
        cat, member = hits[0]
        layer = layers.setdefault(index, {c: {m: [] for m in ms} for c, ms in categories.items()})
        layer[cat][member].append(name)
    if not layers:
        raise ConfigError("half_ft: the model has no decoder layers (no parameter named like 'layers.<i>.')")
    for index, layer in sorted(layers.items()):
        for cat, members in layer.items():
            missing = [m for m, names in members.items() if not names]
            if missing:
                raise ConfigError(f"half_ft: decoder layer {index} has no module {missing} of category '{cat}'")
    return [layers[i] for i in sorted(layers)]


def anatomy_layers(model: torch.nn.Module) -> list[dict[str, dict[str, list[str]]]]:
    """`group_layers`'s result from the model anatomy layer: per decoder layer {category: {member: [parameter
    names]}}, categories in `CATEGORIES` order (only those the layer has), members in module order."""
    layers = []
    for layer_name, members in model_members(model, "half_ft"):
        layer: dict[str, dict[str, list[str]]] = {}
        for category in CATEGORIES:
            for m in members:
                if m.category == category:
                    layer.setdefault(category, {})[m.path] = [f"{layer_name}.{p}" for p in m.params]
        layers.append(layer)
    return layers


def _describe(categories: dict[str, list[str]]) -> str:
    return "; ".join(f"{c}: {', '.join(ms)}" for c, ms in categories.items())


def selection_rng(seed: int, stage: int) -> random.Random:
    """The same generator on every rank and in every process for (seed, stage)."""
    digest = hashlib.sha256(f"half_ft/{seed}/{stage}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def draw_frozen(
    layers: list[dict[str, dict[str, list[str]]]],
    sizes: dict[str, int],
    seed: int,
    stage: int = 0,
    balance: str = "count",
) -> list[str]:
    """Names of the parameters HFT freezes (sorted). `sizes[name]` = number of elements.

    A category of n members freezes n/2 of them; for odd n a random floor(L/2) of the layers freeze
    ceil(n/2), the rest floor(n/2) (the paper's FFN rule: 2 of 3 in half the layers, 1 of 3 elsewhere).
    """
    if balance not in ("count", "params"):
        raise ConfigError(f"half_ft: balance must be 'count' or 'params', got {balance!r}")
    rng = selection_rng(seed, stage)
    categories = list(dict.fromkeys(cat for layer in layers for cat in layer))
    # one draw of "which layers round up" per odd category, in category order, before the layer loop (among
    # the layers that have the category with an odd count: MoE models may mix dense and sparse layers)
    round_up = {}
    for cat in categories:
        odd = [i for i, layer in enumerate(layers) if len(layer.get(cat, ())) % 2]
        if odd:
            round_up[cat] = set(rng.sample(odd, len(odd) // 2))
    larger_half = _larger_member_layers(layers, sizes, categories, rng) if balance == "params" else {}
    frozen: list[str] = []
    for index, layer in enumerate(layers):
        for cat in categories:
            members = list(layer.get(cat, ()))
            if not members:
                continue
            k = len(members) // 2 + (1 if index in round_up.get(cat, ()) else 0)
            if cat in larger_half and index in larger_half[cat][0]:
                picked = [max(members, key=lambda m: _member_size(layer, cat, m, sizes))]
            elif cat in larger_half and index in larger_half[cat][1]:
                picked = [min(members, key=lambda m: _member_size(layer, cat, m, sizes))]
            elif balance == "count" or k in (0, len(members)):  # a 1-member category (router) has no subsets
                picked = rng.sample(members, k)
            else:
                counts = {m: sum(sizes[n] for n in layer[cat][m]) for m in members}
                picked = list(rng.choice(closest_share_subsets(counts, k / len(members))))
            for m in picked:
                frozen.extend(layer[cat][m])
    return sorted(frozen)


def _member_size(layer: dict, cat: str, member: str, sizes: dict[str, int]) -> int:
    return sum(sizes[n] for n in layer[cat][member])


def _larger_member_layers(layers: list[dict], sizes: dict[str, int], categories: list[str], rng: random.Random):
    """`balance: params` for a category of two members of unequal size (a fused projection beside a plain one:
    Phi-3's qkv_proj / o_proj, GPT-2's c_attn / c_proj): no choice inside a layer halves it, so, as the paper's
    FFN rule does across layers, the larger member is frozen in a random half of those layers and the smaller in
    the others: the category is then half of its parameters over the decoder (exactly, for an even count of
    layers). {category: (layers freezing the larger, layers freezing the smaller)}; equal-size pairs (norms) and
    other categories are not drawn here, so their draws are unchanged."""
    chosen = {}
    for cat in categories:
        pairs = [
            i
            for i, layer in enumerate(layers)
            if len(layer.get(cat, ())) == 2 and len({_member_size(layer, cat, m, sizes) for m in layer[cat]}) == 2
        ]
        if pairs:
            larger = set(rng.sample(pairs, len(pairs) // 2))
            chosen[cat] = (larger, set(pairs) - larger)
    return chosen


def closest_share_subsets(counts: dict[str, int], share: float) -> list[tuple[str, ...]]:
    """All subsets of the members whose summed count is closest to `share` of the total (ties kept,
    in a fixed order). For equal counts these are exactly the subsets of size share * n."""
    members = list(counts)
    target = share * sum(counts.values())
    subsets = [c for r in range(1, len(members)) for c in itertools.combinations(members, r)]
    gaps = [abs(sum(counts[m] for m in s) - target) for s in subsets]
    best = min(gaps)
    return [s for s, g in zip(subsets, gaps) if g <= best + 1e-9 * max(target, 1.0)]


def trainable_fraction(named_sizes: dict[str, int], frozen: set[str]) -> float:
    total = sum(named_sizes.values())
    return sum(n for name, n in named_sizes.items() if name not in frozen) / max(total, 1)


# -- the regularizer -----------------------------------------------------------------------------------


@dataclass
class HalfFTOptions:
    seed: int = option(0, "selection seed; the draw depends on (seed, stage) only", ge=0)
    stage: int = option(0, "stage index of a multi-stage recipe (filled in by `stages:`); each stage draws anew", ge=0)
    balance: Literal["count", "params"] = option(
        "count",
        "count: freeze half of each category's matrices (paper); params: subsets closest to half the "
        "category's parameters (GQA models)",
    )
    categories: dict[str, list[str]] = option(
        {},
        "module names (or dotted paths such as attn.c_proj) per category inside a decoder layer; default ({}): "
        "from the model's anatomy (attention, ffn, norms, qk_norms, router; see llmreg/core/families.py)",
    )
    train_embeddings: bool = option(True, "keep embeddings and LM head trainable (False: the paper's worse ablation)")


@register("half_ft")
class HalfFineTuning(Regularizer):
    """HFT: freeze a seeded half of each decoder layer's attention, FFN and norm tensors (arXiv 2404.18466).

    Example::

        RegSFTTrainer(..., regularizers=[{"name": "half_ft", "seed": 0}])

    In a recipe: ``regularizers: [{name: half_ft, seed: 0}]`` (a multi-stage recipe fills in `stage`).
    """

    options_cls = HalfFTOptions
    order = Order.FREEZE
    requires = Requirements(supports_peft=False)
    loads_state_early = True  # the frozen set must be back before the optimizer exists

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.frozen: list[str] = []
        self._fraction = 1.0
        self._model: torch.nn.Module | None = None
        self._loaded: list[str] | None = None  # a frozen set loaded before setup; setup applies it, no draw

    def setup(self, model: torch.nn.Module, trainer: Any) -> None:
        self._model = model
        if self._loaded is not None:
            self._apply(self._loaded)
            return
        named = list(model.named_parameters())
        sizes = {n: _numel(p) for n, p in named}
        if self.options.categories:
            layers = group_layers([n for n, _ in named], self.options.categories)
        else:
            layers = anatomy_layers(model)
        frozen = draw_frozen(layers, sizes, self.options.seed, self.options.stage, self.options.balance)
        if not self.options.train_embeddings:
            frozen = sorted(set(frozen) | {n for n, _ in named if EMBEDDING_PATTERN.search(n)})
        self._apply(frozen)
        logger.info(
            "half_ft (seed %d, stage %d): %d tensors frozen, %.1f%% of the parameters trainable",
            self.options.seed,
            self.options.stage,
            len(frozen),
            100 * self._fraction,
        )

    def _apply(self, frozen: list[str]) -> None:
        named = dict(self._model.named_parameters())
        unknown = sorted(set(frozen) - set(named))
        if unknown:
            raise ConfigError(f"half_ft: the frozen set names parameters this model lacks: {unknown[:5]}")
        # a different trainable set on one rank would hang or corrupt the gradient reduction
        dist.check_same_on_every_rank(
            frozen, "half_ft: the frozen sets (check that seed and stage are the same on every rank)"
        )
        frozen_set = set(frozen)
        for name, p in named.items():
            if p.is_floating_point():
                p.requires_grad_(name not in frozen_set)
        self.frozen = list(frozen)
        self._fraction = trainable_fraction({n: _numel(p) for n, p in named.items()}, frozen_set)

    def metrics(self) -> dict[str, float]:
        return {"trainable_fraction": self._fraction}

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.options.seed,
            "stage": self.options.stage,
            "balance": self.options.balance,
            "frozen": list(self.frozen),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "frozen" not in state:
            raise ValueError("half_ft: the checkpoint's state has no frozen set; cannot resume with the same mask")
        if self._model is None:  # not set up yet: setup applies this set instead of drawing one
            self._loaded = self.frozen = list(state["frozen"])
            return
        if sorted(state["frozen"]) != sorted(self.frozen):
            logger.warning(
                "half_ft: resuming with the checkpoint's frozen set (seed %s, stage %s), not this "
                "run's draw (seed %d, stage %d)",
                state.get("seed"),
                state.get("stage"),
                self.options.seed,
                self.options.stage,
            )
        self._apply(list(state["frozen"]))


def _numel(p: torch.Tensor) -> int:
    return math.prod(full_shape(p))  # also for a ZeRO-3 placeholder
