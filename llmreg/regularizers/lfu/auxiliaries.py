"""LfU's three kinds of auxiliary tensors, one class each behind one interface (`Auxiliary`):

- `SteeringVectors` (`aux: reps`): one vector per decoder layer, added to the layer's output;
- `FixedALora` (`aux: lora`, full fine-tuning): s * B_l A_l x on every selected linear layer, A_l fixed and
  seeded, B_l the auxiliary tensor;
- `AdapterShadows` (`aux: lora` under PEFT LoRA): zero "shadow" tensors e_A, e_B inside the trained adapter,
  whose gradients at 0 are dL/dA and dL/dB.

Each asks the `MicroStepTracker` which tensor to add in the running forward (a zero leaf of the clean pass, the
ascent step delta, or nothing), keyed by a hashable key of its own.

Mixture-of-experts models (issue 16): a perturbation enters per row of the batch (the clean and the perturbed
branch may share one stacked forward), so it needs a module whose output it can add to. MoE expert tensors are
3-D parameters used inside the experts' own forward and PEFT folds their adapters (and the router's) into the
weight (`ParamWrapper`); neither has such an output. `aux: lora` therefore refuses them with a clear message
instead of silently perturbing the attention only: under full fine-tuning, name the perturbed modules with
`aux_lora_targets`; under PEFT, leave experts and routers out of the LoRA `target_modules`; or use `aux: reps`.
GPT-2's Conv1D layers are perturbed like nn.Linear (their weight is stored [in, out]).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from llmreg.core.anatomy import is_peft
from llmreg.core.families import is_conv1d, is_projection, moe_parts
from llmreg.core.options import ConfigError
from llmreg.regularizers.lfu.formulas import kaiming_uniform
from llmreg.regularizers.lfu.micro_step import MicroStepTracker

AddHook = Callable[[Any], None]


class Auxiliary:
    """Where one kind of auxiliary tensors enters the forward."""

    kind = ""
    model: torch.nn.Module | None = None  # the trained model (FixedALora checks it for MoE parts)
    # hooks on modules inside the decoder layers (re-run by an activation-checkpoint recompute) rather than on
    # the layers themselves
    hooks_inside_layers = True

    def __init__(self, tracker: MicroStepTracker, options: Any) -> None:
        self.tracker = tracker
        self.options = options

    def install(self, layers: list[torch.nn.Module], add_hook: AddHook) -> None:
        """Register the hooks (through `add_hook`, which keeps the handles); ConfigError when nothing matches."""

    def layer_output(self, index: int, h: torch.Tensor) -> torch.Tensor | None:
        """The decoder layer's hidden state with the perturbation added, or None to leave it as it is."""
        return None


class SteeringVectors(Auxiliary):
    """RepS: one zero vector per decoder layer each step, added to the layer's output."""

    kind = "reps"
    hooks_inside_layers = False

    def layer_output(self, index: int, h: torch.Tensor) -> torch.Tensor | None:
        vec = self.tracker.aux_value(
            ("reps", index), h.shape[0], lambda: torch.zeros(h.shape[-1], dtype=h.dtype, device=h.device)
        )
        return None if vec is None else h + vec


class FixedALora(Auxiliary):
    """Full fine-tuning: a rank-r perturbation s * B A x on the selected linear layers; A fixed (seeded, the same
    on every rank), B the auxiliary tensor (0 in the clean pass)."""

    kind = "lora_full"

    def __init__(self, tracker: MicroStepTracker, options: Any) -> None:
        super().__init__(tracker, options)
        self.a_factors: dict[Any, torch.Tensor] = {}  # fp32 on CPU, by key ("lora", "<layer>.<module name>")
        self._a_cast: dict[tuple, torch.Tensor] = {}  # the same, per (key, device, dtype)

    def install(self, layers: list[torch.nn.Module], add_hook: AddHook) -> None:
        patterns = [re.compile(p) for p in self.options.aux_lora_targets]
        if not patterns:
            _refuse_moe_without_targets(self.model)
        gen = torch.Generator().manual_seed(self.options.seed)
        count = 0
        for index, layer in enumerate(layers):
            for name, module in layer.named_modules():
                if not is_projection(module):
                    continue
                full = f"{index}.{name}"
                if patterns and not any(p.search(full) for p in patterns):
                    continue
                key = ("lora", full)
                self.a_factors[key] = kaiming_uniform(self.options.aux_lora_rank, _features(module)[0], gen)
                add_hook(module.register_forward_hook(self._hook(key)))
                count += 1
        if not count:
            raise ConfigError(
                f"lfu: aux_lora_targets {self.options.aux_lora_targets} match no linear layer of the decoder"
            )

    def _hook(self, key: Any):
        scale = self.options.aux_lora_alpha / self.options.aux_lora_rank

        def hook(module, args, output):
            x = args[0]
            b = self.tracker.aux_value(
                key,
                x.shape[0],
                lambda: torch.zeros(_features(module)[1], self.options.aux_lora_rank, dtype=x.dtype, device=x.device),
            )
            if b is None:
                return output
            a = self._a_like(key, x)
            if b.requires_grad:  # the zero leaf of the clean pass
                return ZeroAuxLinear.apply(output, x, b, a, scale, self.tracker.ascent_active)
            # one fused GEMM-and-add (output + scale * (A x) delta^T): no separate scaled [tokens, out] temporaries
            u = F.linear(x, a).reshape(-1, a.shape[0])
            return torch.addmm(output.reshape(-1, output.shape[-1]), u, b.t(), alpha=scale).view_as(output)

        return hook

    def _a_like(self, key: Any, x: torch.Tensor) -> torch.Tensor:
        cache_key = (key, x.device, x.dtype)
        a = self._a_cast.get(cache_key)
        if a is None:
            a = self._a_cast[cache_key] = self.a_factors[key].to(device=x.device, dtype=x.dtype)
        return a


class AdapterShadows(Auxiliary):
    """PEFT LoRA: zero tensors e_A, e_B added inside the trained adapter (lora_A output + e_A x, lora_B output
    + e_B u), so the ascent gradient never runs with respect to DeepSpeed-managed parameters."""

    kind = "lora_peft"

    def install(self, layers: list[torch.nn.Module], add_hook: AddHook) -> None:
        count = 0
        for index, layer in enumerate(layers):
            for name, module in layer.named_modules():
                if getattr(module, "parameter_name", None) is not None:  # PEFT's ParamWrapper (experts, router)
                    raise ConfigError(
                        f"lfu: aux lora under PEFT cannot perturb the adapter PEFT puts on '{name}' of decoder layer "
                        f"{index} (a ParamWrapper on the MoE {module.parameter_name} tensor: folded into the weight, "
                        "no output to add a per-row shadow to); leave MoE experts and routers out of the LoRA "
                        "target_modules (e.g. q_proj, k_proj, v_proj, o_proj) or use aux: reps"
                    )
                lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
                if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(lora_b, torch.nn.ModuleDict):
                    continue
                if getattr(module, "lora_variant", None):
                    raise ConfigError("lfu: DoRA and other LoRA variants are not supported with aux: lora")
                for adapter in lora_a.keys():
                    key = f"{index}.{name}.{adapter}"
                    add_hook(lora_a[adapter].register_forward_hook(self._hook(("A", key))))
                    add_hook(lora_b[adapter].register_forward_hook(self._hook(("B", key))))
                    count += 1
        if not count:
            raise ConfigError("lfu: aux lora under PEFT found no LoRA adapter inside the decoder layers")

    def _hook(self, key: Any):
        def hook(module, args, output):
            x = args[0]
            e = self.tracker.aux_value(
                key,
                x.shape[0],
                lambda: torch.zeros(module.out_features, module.in_features, dtype=x.dtype, device=x.device),
            )
            if e is None:
                return output
            if e.requires_grad:  # the zero shadow of the clean pass
                return ZeroAuxLinear.apply(output, x, e, None, 1.0, self.tracker.ascent_active)
            return output + F.linear(x, e)

        return hook


def make_auxiliary(options: Any, model: torch.nn.Module, tracker: MicroStepTracker) -> Auxiliary:
    """The auxiliary of `options.aux` for this model (under PEFT, `lora` means the trained adapter)."""
    if options.aux == "reps":
        return SteeringVectors(tracker, options)
    if is_peft(model):
        return AdapterShadows(tracker, options)
    aux = FixedALora(tracker, options)
    aux.model = model
    return aux


def _features(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) features of a projection: nn.Linear [out, in], Conv1D [in, out]."""
    rows, cols = tuple(getattr(module.weight, "ds_shape", module.weight.shape))
    return (rows, cols) if is_conv1d(module) else (cols, rows)


def _refuse_moe_without_targets(model: torch.nn.Module | None) -> None:
    parts = moe_parts(model) if model is not None else {"experts": [], "router": []}
    if parts["experts"] or parts["router"]:
        found = (parts["experts"] + parts["router"])[:2]
        raise ConfigError(
            f"lfu: aux lora perturbs linear layers only; this mixture-of-experts model's expert tensors and routers "
            f"({', '.join(found)}, ...) would get no perturbation: set aux_lora_targets to the modules to perturb "
            "(e.g. ['self_attn']) or use aux: reps"
        )


class ZeroAuxLinear(torch.autograd.Function):
    """`output + scale * F.linear(F.linear(x, a), e)` at e = 0 (a = None: `output + F.linear(x, e)`), the clean
    pass's LoRA perturbation: its value is `output`, so the forward only copies it (no [tokens, out] GEMM).
    The backward passes the gradient g through and gives dL/de = scale * g^T (x a^T) only while the ascent
    gradient is taken (`active[0]`); the trainer's backward gets None for e (at e = 0, dL/dx through the
    perturbation is 0 too), so the zero leaves cost nothing there."""

    @staticmethod
    def forward(ctx, output, x, e, a, scale, active):
        ctx.save_for_backward(x, a)
        ctx.scale, ctx.active, ctx.e_dtype = scale, active, e.dtype
        return output.clone()  # a new tensor, not a view: later in-place ops on it stay legal

    @staticmethod
    def backward(ctx, g):
        grad_e = None
        if ctx.active[0]:
            x, a = ctx.saved_tensors
            u = x.reshape(-1, x.shape[-1]).float()  # fp32: under autocast g and x may differ in dtype
            if a is not None:
                u = F.linear(u, a.float())
            grad_e = (ctx.scale * (g.reshape(-1, g.shape[-1]).float().t() @ u)).to(ctx.e_dtype)
        return g, None, grad_e, None, None, None
