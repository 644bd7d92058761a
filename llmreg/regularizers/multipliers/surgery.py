"""Where multipliers go (placements) and how they are attached to a model.

A multiplied layer keeps its module, its class's behaviour and its parameter names (`q_proj.weight`
stays `q_proj.weight`): the module's class is swapped for a subclass whose `forward` applies the
multipliers, and the multipliers are registered on that module as `lrm_row`, `lrm_col` and `lrm_scalar`.
So checkpoints, parameter-name patterns (weight decay, forgetting importances) and HF weight tying are
unchanged, every multiplier sits next to its weight (ZeRO-3 gathers it with the module), and a saved
state dict alone says which layer carries which multiplier (`plan_from_state_dict`), which is all
`llmreg export` needs.

A plan is {module name: LayerPlan}; `plan_for_model` builds it from a placement, `attach` applies it.

Architecture families (issue 16, `llmreg.core.families`): an embedding that scales its own output (Gemma's
`embed_scale`, sqrt(hidden)) keeps that scale, so the wrapped model equals the plain one at init. Mixture-of-
experts models are refused unless `moe: skip`: the paper has no answer for a router (a multiplier on its rows
re-weights the routing logits), and 3-D expert stacks are not wrapped (the experts' forward indexes the tensor
itself, so no module-level wrapper reaches one expert's matrix; forming W_eff for every expert would hold a second
copy of all expert weights for the backward); `skip` wraps the other layers only, and says so. GPT-2's Conv1D
layers (weight stored [in, out]) are refused with a message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

import llmreg.regularizers.multipliers.functional as Fm
from llmreg.core.anatomy import LAYER_PATTERN, full_shape
from llmreg.core.families import embedding_scale, is_conv1d, moe_parts
from llmreg.core.options import ConfigError, closest

ROW, COL, SCALAR = "lrm_row", "lrm_col", "lrm_scalar"
MULTIPLIER_NAMES = (ROW, COL, SCALAR)
PLACEMENTS = ("all", "symmetry_aware", "scalar", "none")

# paper App. C, pre-norm Llama-style blocks (norm gains kept): module name -> multipliers
SYMMETRY_AWARE = {
    "up_proj": "",
    "gate_proj": "row",
    "down_proj": "row,col",
    "q_proj": "row",
    "k_proj": "",
    "v_proj": "",
    "o_proj": "row,col",
}


def is_multiplier(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in MULTIPLIER_NAMES


@dataclass(frozen=True)
class LayerPlan:
    row: bool = False
    col: bool = False
    scalar: bool = False

    def __bool__(self) -> bool:
        return self.row or self.col or self.scalar


def parse_kinds(text: str, where: str) -> LayerPlan:
    kinds = {k.strip() for k in text.split(",") if k.strip()}
    bad = kinds - {"row", "col", "scalar"}
    if bad:
        raise ConfigError(f"{where}: unknown multiplier kind {sorted(bad)}; use a comma list of row, col, scalar or ''")
    return LayerPlan(row="row" in kinds, col="col" in kinds, scalar="scalar" in kinds)


def _is_tied(model: nn.Module) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def plan_for_model(
    model: nn.Module,
    placement: str,
    *,
    lm_head: bool = False,
    tied_embeddings: str = "skip",
    symmetry_table: dict[str, str] | None = None,
    moe: str = "refuse",
) -> tuple[dict[str, LayerPlan], list[str]]:
    """(plan, notes). Decoder-block linears (modules inside `layers.<i>.`), the input embedding, and the LM
    head only with `lm_head=True`. Raises ConfigError for an unknown placement, a model with no target, or an
    MoE model unless `moe="skip"` (experts and routers then keep no multipliers)."""
    if placement not in PLACEMENTS:
        hint = closest(placement, PLACEMENTS)
        raise ConfigError(
            f"multipliers: unknown placement {placement!r}"
            + (f"; did you mean {hint!r}?" if hint else f"; choose one of {', '.join(PLACEMENTS)}")
        )
    notes: list[str] = []
    if placement == "none":
        return {}, ["placement 'none': no multipliers (ablation)"]
    moe_modules = _moe_modules(model, moe, notes)
    table = {
        k: parse_kinds(v, f"multipliers.symmetry_table.{k}") for k, v in (symmetry_table or SYMMETRY_AWARE).items()
    }
    everywhere = LayerPlan(scalar=True) if placement == "scalar" else LayerPlan(row=True, col=True)
    plan: dict[str, LayerPlan] = {}
    unknown: list[str] = []
    seen = 0
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head or not LAYER_PATTERN.search(name + "."):
            continue
        if any(name == m or name.startswith(m + ".") for m in moe_modules):
            continue
        seen += 1
        if placement == "symmetry_aware":
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in table:
                unknown.append(name)
                continue
            layer_plan = table[leaf]
        else:
            layer_plan = everywhere
        if layer_plan:
            plan[name] = layer_plan
    if unknown:
        raise ConfigError(
            f"multipliers: placement 'symmetry_aware' has no rule for {unknown[:3]}; pass "
            "symmetry_table mapping these module names to row/col/scalar (or '')"
        )
    _check_found(model, seen)
    _plan_embeddings(model, plan, notes, everywhere, lm_head=lm_head, tied_embeddings=tied_embeddings)
    return plan, notes


def _check_found(model: nn.Module, seen: int) -> None:
    """ConfigError when the decoder blocks hold no nn.Linear (GPT-2's Conv1D named as such)."""
    if not seen and any(is_conv1d(m) for m in model.modules()):
        raise ConfigError(
            "multipliers: the decoder blocks hold transformers Conv1D layers (GPT-2: weight stored [in, out]), "
            "which multipliers do not wrap; use an architecture with nn.Linear layers"
        )
    if not seen:
        raise ConfigError(
            "multipliers: the model has no nn.Linear layers inside decoder blocks (modules named "
            "like 'layers.<i>.'); nothing to attach multipliers to"
        )


def _moe_modules(model: nn.Module, moe: str, notes: list[str]) -> list[str]:
    """The expert stacks and routers of an MoE model (left without multipliers); ConfigError unless moe=skip."""
    parts = moe_parts(model)
    found = parts["experts"] + parts["router"]
    if found and moe != "skip":
        raise ConfigError(
            f"multipliers: this mixture-of-experts model's routers and expert tensors ({', '.join(found[:2])}, ...) "
            "take no multipliers (the paper has no answer for routers; 3-D expert stacks are not wrapped); set "
            "`moe: skip` to put multipliers on the other layers only"
        )
    if found:
        notes.append(f"moe: skip: {len(parts['experts'])} expert stacks and {len(parts['router'])} routers unwrapped")
    return found


def _plan_embeddings(
    model: nn.Module, plan: dict, notes: list[str], everywhere: LayerPlan, *, lm_head: bool, tied_embeddings: str
) -> None:
    """The input embedding's multipliers (unless tied and skipped) and, with `lm_head`, the head's."""
    names = {id(m): n for n, m in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = _is_tied(model)
    if isinstance(embed, nn.Embedding):
        if tied and tied_embeddings == "skip":
            notes.append("tied input/output embeddings: no embedding multipliers (tied_embeddings='skip')")
        else:
            plan[names[id(embed)]] = everywhere
            if tied:
                notes.append("tied embeddings with multipliers: `llmreg export` writes a separate LM head")
    if lm_head and isinstance(head, nn.Linear):
        plan[names[id(head)]] = (
            LayerPlan(scalar=True) if everywhere.scalar else LayerPlan(row=True)
        )  # scalar placement: scalar


def plan_from_state_dict(keys: Iterable[str]) -> dict[str, LayerPlan]:
    """Which module carries which multiplier, read from saved parameter names."""
    found: dict[str, set[str]] = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        if leaf in MULTIPLIER_NAMES:
            found.setdefault(module, set()).add(leaf)
    return {m: LayerPlan(row=ROW in k, col=COL in k, scalar=SCALAR in k) for m, k in found.items()}


# -- the multiplied modules -----------------------------------------------------------------------------


class _Multiplied:
    """Mixin of the swapped-in classes: the multipliers present on this module."""

    lrm_impl: str = "fused"

    def _lrm_row(self) -> torch.Tensor | None:
        row = getattr(self, ROW, None)
        scalar = getattr(self, SCALAR, None)
        if scalar is None:
            return row
        return scalar if row is None else scalar * row


class MultipliedLinear(_Multiplied, nn.Linear):
    """nn.Linear with W_eff = diag(s r) W diag(c); the bias is not scaled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row, col = self._lrm_row(), getattr(self, COL, None)
        if row is not None and row.shape[0] != self.out_features:  # a scalar only
            row = row.expand(self.out_features)
        fn = Fm.multiplied_linear if self.lrm_impl == "fused" else Fm.explicit_linear
        return fn(x, self.weight, row, col, self.bias)


class MultipliedEmbedding(_Multiplied, nn.Embedding):
    """nn.Embedding with per-token row and per-feature column multipliers."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        row, col = self._lrm_row(), getattr(self, COL, None)
        if row is not None and row.numel() == 1:  # a scalar only
            col = row if col is None else row * col
            row = None
        out = self._multiplied(ids, row, col)
        scale = embedding_scale(self)  # Gemma's own forward multiplies by embed_scale (sqrt(hidden))
        return out if scale is None else out * (scale.to(self.weight.dtype) if torch.is_tensor(scale) else scale)

    def _multiplied(self, ids: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None) -> torch.Tensor:
        return Fm.multiplied_embedding(
            ids,
            self.weight,
            row,
            col,
            padding_idx=self.padding_idx,
            max_norm=self.max_norm,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
        )


_SUBCLASSES: dict[type, type] = {nn.Linear: MultipliedLinear, nn.Embedding: MultipliedEmbedding}


def _multiplied_class(cls: type) -> type:
    if cls in _SUBCLASSES.values() or issubclass(cls, _Multiplied):
        return cls
    if cls not in _SUBCLASSES:
        base = MultipliedLinear if issubclass(cls, nn.Linear) else MultipliedEmbedding
        _SUBCLASSES[cls] = type(f"Multiplied{cls.__name__}", (base, cls), {})
    return _SUBCLASSES[cls]


def attach(
    model: nn.Module,
    plan: dict[str, LayerPlan],
    *,
    dtype: torch.dtype = torch.float32,
    init: dict[str, float] | None = None,
    impl: str = "fused",
) -> list[str]:
    """Register the planned multipliers (value 1, or `init[leaf module name]`) and swap each planned module's
    class; returns the new parameter names. Works on ZeRO-3 placeholders: shapes come from `ds_shape`."""
    modules = dict(model.named_modules())
    added: list[str] = []
    for name, layer_plan in plan.items():
        module = modules[name]
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise ConfigError(f"multipliers: {name} is a {type(module).__name__}, not nn.Linear or nn.Embedding")
        if isinstance(module, _Multiplied):
            raise ConfigError(f"multipliers: {name} already carries multipliers (applied twice?)")
        rows, cols = full_shape(module.weight)
        value = float((init or {}).get(name.rsplit(".", 1)[-1], 1.0))
        device = module.weight.device
        sizes = {ROW: rows, COL: cols, SCALAR: 1}
        wanted = [k for k, on in ((ROW, layer_plan.row), (COL, layer_plan.col), (SCALAR, layer_plan.scalar)) if on]
        for kind in wanted:
            # a given init value goes to one factor only (the scalar if present, else the rows), so the
            # product W_eff starts at value * W
            first = SCALAR if layer_plan.scalar else (ROW if layer_plan.row else COL)
            fill = value if kind == first else 1.0
            module.register_parameter(kind, nn.Parameter(torch.full((sizes[kind],), fill, dtype=dtype, device=device)))
            added.append(f"{name}.{kind}")
        module.__class__ = _multiplied_class(type(module))
        module.lrm_impl = impl
    return added


def merge_state_dict(
    state: dict[str, torch.Tensor], plan: dict[str, LayerPlan] | None = None
) -> dict[str, torch.Tensor]:
    """A plain state dict: every multiplied weight replaced by its merged weight, multipliers removed."""
    plan = plan_from_state_dict(state) if plan is None else plan
    out = {k: v for k, v in state.items() if not is_multiplier(k)}
    for module in plan:
        key = f"{module}.weight"
        if key not in state:
            raise KeyError(f"multipliers on {module} but no {key} in the state dict")
        row = state.get(f"{module}.{ROW}")
        scalar = state.get(f"{module}.{SCALAR}")
        if scalar is not None:
            row = scalar.float().expand(state[key].shape[0]) if row is None else scalar.float() * row.float()
        out[key] = Fm.merge_linear(state[key], row, state.get(f"{module}.{COL}"))
    return out


def layer_kind(name: str) -> str:
    """`q_proj`, `embed_tokens`, ...: the key of per-kind options and metrics."""
    return re.sub(r"^.*\.", "", name)
