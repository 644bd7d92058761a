"""The `noisefit` regularizer: layer selection, noise hooks, and the hybrid loss as the training loss (the method
and its departures: see the package docstring)."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import torch

import llmreg.core.anatomy as anatomy
import llmreg.core.dist as dist
from llmreg.core.options import ConfigError
from llmreg.core.output_head import logit_transform, with_transform
from llmreg.core.registry import register
from llmreg.core.regularizer import LossContext, Order, Regularizer, Requirements
from llmreg.core.running_mean import RunningMean
from llmreg.integrations.hf_access import accepts_logits_to_keep, calibration_batch
from llmreg.integrations.moe import RouterAux, is_moe, router_aux
from llmreg.regularizers.noisefit.calibration import v2_policy
from llmreg.regularizers.noisefit.host import check_trainer, clean_router_logits, model_inputs, repeat3
from llmreg.regularizers.noisefit.loss import hybrid_loss, hybrid_sums, positions
from llmreg.regularizers.noisefit.noise import (
    adaptive_noise,
    branch_base,
    draw_seed,
    select_layers,
    standard_normal,
    training_noise_key,
)
from llmreg.regularizers.noisefit.options import NoiseFiTOptions
from llmreg.regularizers.noisefit.prefix import SharedPrefix, dropout_rate
from llmreg.regularizers.noisefit.selection import LayerProbe

logger = logging.getLogger(__name__)
# recompute_logits="auto": keeping the logits costs about this much per copy and saves one LM-head forward per chunk
RECOMPUTE_ABOVE_BYTES = 256 * 2**20


@register("noisefit")
class NoiseFiT(Regularizer):
    """NoiseFiT (arXiv 2504.03302): adaptive noise on SNR-selected layers, trained with the hybrid loss.

    Example::

        RegSFTTrainer(..., regularizers=[{"name": "noisefit", "num_layers": 3, "noise_std": 0.1}])

    In a recipe: ``regularizers: [{name: noisefit, num_layers: 3, noise_std: 0.1}]``.
    """

    options_cls = NoiseFiTOptions
    order = Order.OBJECTIVE
    # it replaces the causal-LM loss of the Trainer and SFTTrainer; DPO / GRPO losses are not a token CE
    requires = Requirements(trainers=("hf", "sft"))

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.selected: list[int] | None = None  # positions among all decoder layers
        self.snr: list[float] = []
        self.scales: dict[int, float] = {}  # v2: noise base per selected layer
        self.policy: dict[str, Any] = {}  # v2: the calibration's report (auto_noise_policy.json)
        self._trainer: Any = None
        self._layers: list[tuple[str, torch.nn.Module]] = []
        self._candidates: list[int] = []
        self._rows: int | None = None  # rows per branch of the armed stacked forward; None: hooks are off
        self._branch: int | None = None  # pack_branches="never": the branch of the running forward
        self._key = (0, 0)  # (optimizer step, shard) of the current micro-batch
        self._micro = (-1, -1)  # (optimizer step, micro-step index)
        self._prefix: SharedPrefix | None = None  # prefix sharing, decided in _install_hooks
        self._means = RunningMean()  # ce / soft / consistency per micro-batch, read at each log

    # -- setup and layer selection ----------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, trainer: Any) -> None:
        self._trainer = trainer
        if trainer is not None:
            check_trainer(trainer)
        checkpointing = getattr(anatomy.unwrap(model), "is_gradient_checkpointing", False) or any(
            getattr(getattr(trainer, "args", None), k, False)
            for k in ("gradient_checkpointing", "activation_checkpointing")
        )
        if self.options.pack_branches == "never" and checkpointing:
            raise ConfigError(
                "noisefit: pack_branches='never' cannot be combined with gradient checkpointing "
                "(the recomputation of a layer cannot tell which branch it belonged to)"
            )
        self._layers = anatomy.decoder_layers(model, where="noisefit")
        pattern = re.compile(self.options.layers) if self.options.layers else None
        self._candidates = [i for i, (name, _) in enumerate(self._layers) if pattern is None or pattern.search(name)]
        if not self._candidates:
            raise ConfigError(
                f"noisefit: layers={self.options.layers!r} matches none of the {len(self._layers)} "
                f"decoder layers (e.g. '{self._layers[0][0]}')"
            )
        if self.options.version == "v1" and self.options.num_layers > len(self._candidates):
            raise ConfigError(
                f"noisefit: num_layers={self.options.num_layers} but only {len(self._candidates)} "
                "candidate decoder layers"
            )
        self._body = anatomy.decoder(model, where="noisefit")
        self._lm_head = model.get_output_embeddings()
        if self._lm_head is None:
            raise ConfigError(f"noisefit: {type(model).__name__} has no output embeddings (LM head)")
        self._keep_one = accepts_logits_to_keep(model)
        # the model's logits: the head, then its own scaling / softcapping (Gemma 2/3, Granite, Cohere, ...)
        self._logits = with_transform(self._lm_head, logit_transform(anatomy.unwrap(model).config))
        self._moe = is_moe(model)
        self._router: RouterAux | None = router_aux(model, trainer)  # the host's router loss, or None

    def on_prepared(self, model: torch.nn.Module, shards: Any) -> None:
        if self.selected is None:
            size = self.options.calib_batch_size or self._trainer.args.per_device_train_batch_size
            purpose = "noisefit: the SNR layer selection"
            if self.options.version == "v1":
                gen = torch.Generator().manual_seed(draw_seed("calib", self.options.seed))
                self.select(model, calibration_batch(self._trainer, size, gen, purpose))
            else:
                # rank r draws global calibration batches r*n .. r*n+n-1, so N ranks x n batches score the same
                # batches (and probe noise) as one process with N*n
                first = self._trainer.args.process_index * self.options.calib_batches
                indices = list(range(first, first + self.options.calib_batches))
                batches = [
                    calibration_batch(
                        self._trainer,
                        size,
                        torch.Generator().manual_seed(draw_seed("calib", self.options.seed, g)),
                        purpose,
                    )
                    for g in indices
                ]
                self.calibrate(model, batches, indices)
                if self._trainer.args.process_index == 0:
                    path = os.path.join(self._trainer.args.output_dir, "auto_noise_policy.json")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w") as f:
                        json.dump(self.policy, f, indent=2)
        self._install_hooks()

    def _probe(self) -> LayerProbe:
        return LayerProbe(self._layers, self._body, self._logits, self._forward_kwargs(), self.options)

    def calibrate(
        self, model: torch.nn.Module, batches: list[dict[str, Any]], indices: list[int] | None = None
    ) -> list[int]:
        """v2: the KL / CE response of every candidate layer to every candidate scale on `batches` (eval mode,
        no grad; sums all-reduced over ranks), then `calibration.v2_policy`."""
        opts = self.options
        factors = list(opts.scale_factors)
        kl, dce, counts, hidden = self._probe().kl_response(model, batches, indices, self._candidates)
        kl, dce, counts = (dist.all_reduce_sum_on_backend(t) for t in (kl, dce, counts))
        n = counts[0].clamp(min=1)
        self.policy = v2_policy(
            kl / n,
            dce / n,
            float(counts[1] / n),
            factors,
            hidden,
            self._candidates,
            opts.max_ce_ratio,
            opts.scale_prior,
            opts.target_kl_frac,
            opts.depth_bands,
            num_layers=len(self._layers),
        )
        self.policy.update(
            clean_ce=float(counts[1] / n),
            kl=(kl / n).tolist(),
            ce_delta=(dce / n).tolist(),
            scale_factors=factors,
            layers=list(self._candidates),
        )
        self.selected = _rank0_choice(self.policy["selected"])
        self.scales = {int(k): float(v) for k, v in dist.broadcast_object(self.policy["scales"]).items()}
        logger.info("noisefit v2: noise on layers %s with scales %s", self.selected, self.scales)
        return self.selected

    def select(self, model: torch.nn.Module, batch: dict[str, Any]) -> list[int]:
        """Score every candidate layer on `batch` (eval mode, no grad) and keep the top / bottom k.

        Every rank runs the forward (under ZeRO-3 the parameter gathers are collective) on the same seeded batch
        with the same seeded draws; rank 0's choice is then broadcast so the ranks cannot disagree."""
        opts = self.options
        snr = self._probe().snr(model, batch, self._candidates)
        picked = [self._candidates[j] for j in select_layers(snr, opts.num_layers, opts.select)]
        self.selected = _rank0_choice(picked)
        self.snr = snr.tolist()
        logger.info(
            "noisefit: SNR %s; noise on layers %s (%s SNR)", [round(s, 3) for s in self.snr], self.selected, opts.select
        )
        return self.selected

    def _install_hooks(self) -> None:
        self.teardown()
        for index in self.selected:
            self.add_hook(self._layers[index][1].register_forward_hook(self._noise_hook(index), with_kwargs=True))
        first = min(self.selected)
        self._prefix = SharedPrefix(first, lambda: self._rows) if self._decide_prefix_sharing(first) else None
        if self._prefix is not None:
            for _, layer in self._layers[first + 1 :]:
                self.add_hook(layer.register_forward_pre_hook(self._prefix.stack_inputs, with_kwargs=True))

    @property
    def _share_prefix(self) -> bool:
        return self._prefix is not None

    def _decide_prefix_sharing(self, first: int) -> bool:
        opts = self.options
        if opts.pack_branches != "auto" or opts.prefix_sharing is False:
            return False
        prefix = [m for _, layer in self._layers[: first + 1] for m in layer.modules()]
        embed = self._body.get_input_embeddings() if hasattr(self._body, "get_input_embeddings") else None
        prefix += list(embed.modules()) if embed is not None else []
        dropout = [m for m in prefix if dropout_rate(m) > 0]
        if dropout and opts.prefix_sharing:
            logger.warning(
                "noisefit: prefix_sharing with dropout in the shared layers: the three branches share "
                "one dropout mask there"
            )
        return bool(opts.prefix_sharing) or not dropout

    def _forward_kwargs(self) -> dict[str, Any]:
        # only the final hidden states are used: skip the [rows, T, V] logits of the model's own head, and the
        # top model's router loss (on the stacked rows; the clean branch's is computed in training_loss)
        return {
            "use_cache": False,
            **({"logits_to_keep": 1} if self._keep_one else {}),
            **({"output_router_logits": False} if self._moe else {}),
        }

    # -- training ---------------------------------------------------------------------------------------------
    def _noise_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            # off in eval mode, under no_grad (generate, evaluation) and outside the stacked training forward
            if self._rows is None or not module.training or not torch.is_grad_enabled():
                return None
            if self._branch is not None:  # pack_branches="never": one branch per forward
                if self._branch == 0:
                    return None
                h = output if torch.is_tensor(output) else output[0]
                noisy = self._noisy_branch(h, layer, self._branch)
                return noisy if torch.is_tensor(output) else (noisy, *output[1:])
            h = output if torch.is_tensor(output) else output[0]
            rows = self._rows
            if h.dim() != 3:
                raise RuntimeError(f"noisefit: layer {layer} returned shape {tuple(h.shape)}, expected [rows, T, d]")
            if self._prefix is not None and layer == self._prefix.first and h.shape[0] == rows:
                if not self._prefix.starts_branches(args[0] if args else kwargs.get("hidden_states")):
                    return None  # another forward of `rows` rows: not ours, left clean
                # the shared prefix ends here: the three branches start from this one output
                parts = [h] + [self._noisy_branch(h, layer, b) for b in (1, 2)]
            elif h.shape[0] != 3 * rows:  # another forward between the stacked one and the optimizer step
                return None
            else:
                parts = [h[:rows]] + [self._noisy_branch(h[b * rows : (b + 1) * rows], layer, b) for b in (1, 2)]
            noisy = torch.cat(parts, dim=0)
            return noisy if torch.is_tensor(output) else (noisy, *output[1:])

        return hook

    def _noisy_branch(self, hb: torch.Tensor, layer: int, branch: int) -> torch.Tensor:
        opts = self.options
        eps = standard_normal(hb.shape, hb.device, *training_noise_key(opts.seed, *self._key, layer, branch))
        base = self.scales[layer] if opts.version == "v2" else branch_base(hb, opts.noise_std, opts.double_sigma)
        return adaptive_noise(hb, eps, base, opts.beta, opts.nf_clip, opts.detach_noise_scale)

    def training_loss(self, ctx: LossContext) -> torch.Tensor:
        opts = self.options
        labels = ctx.inputs["labels"]
        rows = labels.shape[0]
        self._advance(ctx.trainer)
        hidden, router_logits = self._branches(ctx, rows)
        pos = positions(labels, opts.shift_mask)
        sums = hybrid_sums(
            hidden,
            pos,
            self._logits,
            opts.temperature,
            opts.detach_teacher,
            opts.chunk_size,
            self._recompute(pos.rows.numel()),
        )
        out = hybrid_loss(sums, opts.alpha, opts.lam, ctx.token_mean, ctx.ga_divisor)
        loss = out["loss"]
        # logged per micro-batch as plain token means (the loss's CE is in the host's accumulation units)
        logged = {
            "ce": sums["nll_sum"] / sums["ce_count"].clamp(min=1),
            "soft": out["soft"],
            "consistency": out["consistency"],
        }
        if self._router is not None:
            # the host's MoE load-balancing term, on the clean branch's routing (see the package docstring)
            clean = clean_router_logits(router_logits, rows * labels.shape[1])
            logged["router_aux"] = self._router.loss(clean, ctx.inputs.get("attention_mask"))
            loss = loss + self._router.weight(ctx.ga_divisor) * logged["router_aux"]
        self._means.add(**{key: value.detach() for key, value in logged.items()})
        return loss

    def _branches(self, ctx: LossContext, rows: int) -> tuple[tuple[torch.Tensor, ...], Any]:
        """The final hidden states of [clean; noisy 1; noisy 2] and the body's router logits (MoE with the router
        loss on: every layer's, recorded in the packed forward or in the clean branch's own forward)."""
        captured: list[Any] = []
        handles = [self._body.register_forward_hook(lambda m, a, out: captured.append(out))]
        if self._router is not None:
            handles.append(self._body.register_forward_pre_hook(RouterAux.record_router_logits, with_kwargs=True))
        self._rows = rows  # armed until post_step: a checkpointed layer re-runs its hook during backward
        try:
            if self.options.pack_branches == "auto":
                if self._prefix is not None:
                    self._prefix.reset()
                    self._prefix.in_training_forward = True
                    try:
                        ctx.model(**model_inputs(ctx.inputs), **self._forward_kwargs())
                    finally:
                        self._prefix.in_training_forward = False
                    if anatomy.final_hidden(captured[0]).shape[0] != 3 * rows:
                        raise RuntimeError(
                            f"noisefit: prefix sharing: the body returned {anatomy.final_hidden(captured[0]).shape[0]}"
                            f" rows, expected 3 x {rows}; set prefix_sharing: false for this model"
                        )
                else:
                    stacked = {k: repeat3(v, rows) for k, v in model_inputs(ctx.inputs).items()}
                    ctx.model(**stacked, **self._forward_kwargs())
                hidden = anatomy.final_hidden(captured[0]).split(rows, dim=0)
            else:
                for branch in (0, 1, 2):
                    self._branch = branch
                    ctx.model(**model_inputs(ctx.inputs), **self._forward_kwargs())
                hidden = tuple(anatomy.final_hidden(out) for out in captured)
        finally:
            for h in handles:
                h.remove()
            self._branch = None
        return hidden, getattr(captured[0], "router_logits", None)

    def _recompute(self, num_positions: int) -> bool:
        if self.options.recompute_logits != "auto":
            return self.options.recompute_logits == "always"
        vocab = self._lm_head.out_features if hasattr(self._lm_head, "out_features") else self._lm_head.weight.shape[0]
        return 3 * num_positions * vocab * 4 > RECOMPUTE_ABOVE_BYTES

    def _advance(self, trainer: Any) -> None:
        """Set the noise key (optimizer step, shard) of this micro-batch; see `training_noise_key`."""
        step = trainer.state.global_step
        micro = self._micro[1] + 1 if self._micro[0] == step else 0
        self._micro = (step, micro)
        self._key = (step, micro * trainer.args.world_size + trainer.args.process_index)

    def post_step(self, shards: Any) -> None:
        self._rows = None  # every backward of the step has run: the hooks go quiet until the next stacked forward
        if self._prefix is not None:
            self._prefix.reset()

    # -- logging and state ------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        out = self._means.pop()
        if self.selected is not None:
            out["num_noisy_layers"] = float(len(self.selected))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "selected": list(self.selected or []),
            "snr": list(self.snr),
            "scales": {int(k): float(v) for k, v in self.scales.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "selected" not in state:
            raise ValueError("noisefit: the checkpoint's state has no selected layers")
        self.selected, self.snr = list(state["selected"]), list(state.get("snr", []))
        self.scales = {int(k): float(v) for k, v in state.get("scales", {}).items()}
        if self.options.version == "v2" and set(self.scales) != set(self.selected):
            raise ValueError("noisefit v2: the checkpoint's state has no noise scale for every selected layer")
        if self._layers and self._hook_handles:  # already training: move the hooks to the saved layers
            self._install_hooks()


def _rank0_choice(picked: list[int]) -> list[int]:
    """Rank 0's layers on every rank (a warning where this rank scored others)."""
    if not dist.is_distributed():
        return picked
    chosen = dist.broadcast_object(picked)
    if chosen != picked:
        logger.warning("noisefit: this rank scored layers %s, rank 0 chose %s; using rank 0's", picked, chosen)
    return list(chosen)
