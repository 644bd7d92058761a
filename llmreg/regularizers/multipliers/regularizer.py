"""The `multipliers` regularizer: learnable multipliers on matrix layers (arXiv 2601.04890).

Paper: Velikanov et al., "Learnable Multipliers: Freeing the Scale of Language Model Matrix Layers",
arXiv 2601.04890 (2026). Spec: ../shared/methods/multipliers.md. No official code was compared.

Hooks:
- `setup` (before the optimizer and the DeepSpeed engine exist): model surgery, see `surgery.py`;
  under ZeRO-3 the model may already be partitioned by `zero.Init`, so shapes come from `ds_shape` and
  the new fp32 parameters are converted by the engine like any other. Unless `clip` is
  "include", it also turns the trainer's own clipping off (`args.max_grad_norm = 0` and, under
  DeepSpeed, `gradient_clipping = 0` in the engine's config) and keeps the threshold to clip itself.
- `param_groups`: the multipliers form their own group, weight decay `weight_decay` (2e-3)
  and learning rate `learning_rate * lr_scale`. Every other parameter keeps the trainer's
  default, which for the HF Trainer is the spec's table already: decay on matrices (embedding and LM
  head included), none on biases and norm gains.
- `pre_step` (after the boundary backward, before the optimizer; under DeepSpeed through the pre-step
  shim): the global-norm clip over the non-multiplier gradients only, on local shards with the sum of
  squares all-reduced under ZeRO; multiplier gradients are left alone ("exclude", the paper's Sec. 4.3),
  clipped by their own norm ("separate") or clipped with the rest by the trainer ("include").
- `metrics`: the two gradient norms before clipping and the mean / RMS of the multiplier values (to watch
  drift along symmetry directions, spec section 5).
State: the multipliers are model parameters, so the model checkpoint holds them (and their Adam moments);
the regularizer's own state is the plan, checked on resume. The run's `final/` holds these wrapped weights
(config.json carries an `llmreg_multipliers` note); `llmreg export RUN_DIR OUT_DIR` writes plain ones.

Departures from the paper / package choices (all in the spec):
- The forward builds W_eff inside one autograd.Function and saves only x and W (see `functional.py`); the
  spec's activation-scaling form is `impl="explicit"`. Both give the same values and
  gradients. The "merged" variant (custom optimizer step on W_eff) is not offered.
- Placement "all" puts row and column multipliers (no scalar, which duplicates the rows) on every linear
  layer inside the decoder blocks and on the input embedding; "scalar" puts one scalar there instead.
- Biases are not scaled; tied embeddings get no embedding multipliers unless
  `tied_embeddings="untie"` (then export writes a separate LM head).
- `init="mup"` takes `mup_values`, {module name: value} (q_proj, embed_tokens, ...): the
  value goes to one factor of the layer (its scalar, else its rows), so W_eff starts at value * W.
- LoRA and other PEFT wrappers are refused (the combination is undefined); Muon is not wired here.
- Mixture-of-experts models are refused unless `moe: skip` (experts and routers then stay unwrapped); GPT-2's
  Conv1D layers are refused; Gemma's embedding scale is kept (surgery.py).
- Under DeepSpeed bf16/fp16 the engine keeps an fp32 master copy of the multipliers; the forward uses
  the engine's low-precision copy like every other parameter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

import llmreg.regularizers.multipliers.surgery as surgery
from llmreg.core.options import ConfigError
from llmreg.core.registry import register
from llmreg.core.regularizer import Order, Regularizer, Requirements, option
from llmreg.regularizers.multipliers.export import CONFIG_NOTE, mark_unexported

logger = logging.getLogger(__name__)


@dataclass
class MultipliersOptions:
    placement: Literal["all", "symmetry_aware", "scalar", "none"] = option(
        "all",
        "all: row+column multipliers on every decoder-block linear and the input embedding (paper default); "
        "symmetry_aware: the paper's redundancy-free table (App. C); scalar: one scalar per matrix; none: ablation",
    )
    weight_decay: float = option(2e-3, "decoupled weight decay of the multipliers (paper Sec. 4.1)", ge=0)
    lr_scale: float = option(1.0, "learning rate of the multipliers relative to the trainer's", ge=0, warn_above=1e3)
    init: Literal["ones", "mup"] = option(
        "ones", "ones: identity at the start; mup: start from `mup_values` (tuned muP forward multipliers)"
    )
    mup_values: dict[str, float] = option({}, "with init=mup: {module name: value}, e.g. {q_proj: 0.5}", gt=0)
    dtype: Literal["float32", "bfloat16"] = option("float32", "storage dtype of the multipliers")
    clip: Literal["exclude", "separate", "include"] = option(
        "exclude",
        "exclude: global clipping skips the multipliers (paper); separate: clip them by their own norm; "
        "include: ordinary global clipping (the paper warns against it)",
    )
    max_grad_norm: float = option(1.0, "with clip=separate: the multipliers' clip threshold", gt=0)
    lm_head: bool = option(False, "per-logit row multipliers on the LM head (hurt in the paper)")
    tied_embeddings: Literal["skip", "untie"] = option(
        "skip", "tied embeddings: skip embedding multipliers, or keep them (export then writes a separate LM head)"
    )
    moe: Literal["refuse", "skip"] = option(
        "refuse",
        "mixture-of-experts models: refuse (the paper has no answer for routers or 3-D expert tensors) | skip: "
        "multipliers on the other layers only, experts and routers unchanged",
    )
    impl: Literal["fused", "explicit"] = option(
        "fused", "fused: one autograd.Function on W_eff, saves only x and W; explicit: scale the activations"
    )
    symmetry_table: dict[str, str] = option(
        dict(surgery.SYMMETRY_AWARE), "symmetry_aware: module name -> multipliers ('row', 'col', 'row,col' or '')"
    )


def clip_factor(total_norm: float, max_norm: float) -> float:
    """torch's clip_grad_norm_ rule: scale by max_norm / (norm + 1e-6) when that is below 1."""
    if max_norm <= 0 or not math.isfinite(total_norm):
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


@register("multipliers")
class LearnableMultipliers(Regularizer):
    """Learnable multipliers: row/column scales of matrix layers, own WD/LR group, no global clip (arXiv 2601.04890).

    Example::

        RegSFTTrainer(..., regularizers=[{"name": "multipliers", "placement": "all"}])

    In a recipe: ``regularizers: [{name: multipliers, placement: all}]``; `llmreg export RUN_DIR OUT_DIR` then
    writes plain weights.
    """

    options_cls = MultipliersOptions
    order = Order.SURGERY
    requires = Requirements(supports_peft=False)
    loads_state_early = True  # the plan decides what the optimizer holds: check it before optimizer state loads

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o.init == "mup" and not o.mup_values:
            raise ConfigError("multipliers: init='mup' needs mup_values {module name: value}")
        if o.init == "ones" and o.mup_values:
            raise ConfigError("multipliers: mup_values is given but init is 'ones'; set init=mup")
        for key, value in o.symmetry_table.items():
            surgery.parse_kinds(value, f"multipliers.symmetry_table.{key}")
        self.names: list[str] = []
        self.plan: dict[str, surgery.LayerPlan] = {}
        self._max_norm: float | None = None
        self._grad_norm: float | None = None
        self._base_lr: float | None = None
        self._metrics: dict[str, float] = {}
        self._loaded: dict[str, Any] | None = None  # state loaded before setup; setup checks it
        self._set_up = False

    # -- setup ------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, trainer: Any) -> None:
        o = self.options
        self.plan, notes = surgery.plan_for_model(
            model,
            o.placement,
            lm_head=o.lm_head,
            tied_embeddings=o.tied_embeddings,
            symmetry_table=o.symmetry_table,
            moe=o.moe,
        )
        init = o.mup_values if o.init == "mup" else None
        dtype = torch.float32 if o.dtype == "float32" else torch.bfloat16
        self.names = surgery.attach(model, self.plan, dtype=dtype, init=init, impl=o.impl)
        self._set_up = True
        if self._loaded is not None:
            self._check_plan(self._loaded)
        config = getattr(model, "config", None)
        if config is not None and self.names:  # saved with the model: tells loaders these are wrapped weights
            setattr(
                config,
                CONFIG_NOTE,
                {
                    "placement": o.placement,
                    "parameters": len(self.names),
                    "note": "the weights hold learnable multipliers (lrm_row/lrm_col/lrm_scalar); "
                    "`llmreg export RUN_DIR OUT_DIR` writes a plain model",
                },
            )
            mark_unexported(config)  # the generic marker: recipes and `llmreg eval` refuse the saved folder
        for note in notes:
            logger.info("multipliers: %s", note)
        logger.info(
            "multipliers: %d multiplier tensors on %d layers (%s)", len(self.names), len(self.plan), o.placement
        )
        args = getattr(trainer, "args", None)
        self._base_lr = float(getattr(args, "learning_rate", 0.0) or 0.0) if args is not None else None
        if args is not None and o.clip != "include":
            self._max_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
            _disable_trainer_clipping(trainer)

    # -- groups ------------------------------------------------------------------------------------
    def param_groups(self, named_params):
        names = [n for n, p in named_params if surgery.is_multiplier(n)]
        if not names:
            return None
        group: dict[str, Any] = {"names": names, "weight_decay": self.options.weight_decay}
        if self.options.lr_scale != 1.0:
            if self._base_lr is None:
                raise ConfigError(
                    "multipliers: lr_scale needs the trainer's learning rate (setup ran without a trainer)"
                )
            group["lr"] = self._base_lr * self.options.lr_scale
        return [group]

    # -- clipping ------------------------------------------------------------------------------------
    def pre_step(self, shards) -> None:
        grads: dict[bool, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {False: [], True: []}
        values: list[torch.Tensor] = []
        device = torch.device("cpu")
        for name, p in shards.named_parameters():
            mult = surgery.is_multiplier(name)
            if mult:
                values.append(shards.without_padding(p, shards.local_param(p)))
            g = shards.local_grad(p)
            if g is not None:
                grads[mult].append((p, g))
                device = g.device  # where the collective must run (NCCL: the GPU)
        # squared norms of the local pieces (no copies: torch's foreach norm, as clip_grad_norm_ uses), then
        # one all-reduce of [|g|^2 others, |g|^2 multipliers, sum m, sum m^2, count m] across ZeRO ranks
        sums = torch.zeros(5, dtype=torch.float64)
        for i, mult in enumerate((False, True)):
            pieces = [shards.without_padding(p, g) for p, g in grads[mult]]
            if pieces:
                sums[i] = torch.nn.utils.get_total_norm(pieces).double().cpu() ** 2
        if values:
            flat = torch.cat(values).double().cpu()
            sums[2:] = torch.stack([flat.sum(), flat.square().sum(), torch.tensor(float(flat.numel()))])
        sums = shards.all_reduce_sum(sums.to(device)).cpu()
        norm, mult_norm = math.sqrt(sums[0].item()), math.sqrt(sums[1].item())
        self._grad_norm = math.sqrt(sums[0].item() + sums[1].item())
        self._metrics = {"grad_norm": norm, "multiplier_grad_norm": mult_norm}
        if sums[4] > 0:
            self._metrics.update(
                multiplier_mean=sums[2].item() / sums[4].item(),
                multiplier_rms=math.sqrt(sums[3].item() / sums[4].item()),
            )
        if self._max_norm is None:  # "include", or set up without a trainer: the trainer clips
            return
        factors = {
            False: clip_factor(norm, self._max_norm),
            True: clip_factor(mult_norm, self.options.max_grad_norm) if self.options.clip == "separate" else 1.0,
        }
        for mult, factor in factors.items():
            if factor != 1.0:
                for p, g in grads[mult]:
                    shards.add_to_grad(p, g, alpha=factor - 1.0)  # g * factor, in the optimizer's units

    def pop_grad_norm(self) -> float | None:
        norm, self._grad_norm = self._grad_norm, None
        return norm

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self._set_up and self._loaded is not None:
            return dict(self._loaded)
        return {"placement": self.options.placement, "parameters": list(self.names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "parameters" not in state:
            raise ValueError("multipliers: the checkpoint's state names no multiplier parameters")
        if self._set_up:
            self._check_plan(state)
        else:
            self._loaded = dict(state)

    def _check_plan(self, state: dict[str, Any]) -> None:
        if sorted(state["parameters"]) != sorted(self.names):
            missing = sorted(set(state["parameters"]) - set(self.names))[:3]
            extra = sorted(set(self.names) - set(state["parameters"]))[:3]
            raise ValueError(
                f"multipliers: the checkpoint was trained with other multipliers (placement "
                f"{state.get('placement')!r}; missing here {missing}, new here {extra})"
            )


def _disable_trainer_clipping(trainer: Any) -> None:
    """The trainer's own global clip would include the multipliers: switch it off (this regularizer clips)."""
    trainer.args.max_grad_norm = 0.0
    configs = []
    hf_ds = getattr(trainer.args, "hf_deepspeed_config", None)
    if hf_ds is not None:
        configs.append(hf_ds.config)
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    if plugin is not None:
        configs.append(plugin.deepspeed_config)
        plugin.gradient_clipping = 0.0
    for cfg in configs:
        cfg["gradient_clipping"] = 0.0
