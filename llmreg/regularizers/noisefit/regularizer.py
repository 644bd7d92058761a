"""The `noisefit` regularizer: SNR layer selection, noise hooks, and the hybrid loss as the training loss."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

from llmreg.core import ConfigError, LossContext, Order, Regularizer, Requirements, option, register
from llmreg.regularizers.noisefit import internals
from llmreg.regularizers.noisefit.loss import hybrid_loss, hybrid_sums, positions
from llmreg.regularizers.noisefit.noise import (
    adaptive_noise, branch_base, draw_seed, layer_snr, select_layers, standard_normal, training_noise_key,
)

logger = logging.getLogger(__name__)
# recompute_logits="auto": keeping the logits costs about this much per copy and saves one LM-head forward per chunk
RECOMPUTE_ABOVE_BYTES = 256 * 2**20


@dataclass
class NoiseFiTOptions:
    noise_std: float = option(0.1, "sigma: noise std relative to std(h) of the branch's hidden states")
    num_layers: int = option(3, "k: number of decoder layers that get noise")
    select: Literal["high", "low"] = option("high", "pick the k layers of highest (v1 'Largest') or lowest SNR")
    layers: str = option("", "regex searched in the decoder-layer module names to restrict the candidates "
                             "(e.g. 'layers\\.(2|3|4)$'); empty: every decoder layer")
    beta: float = option(0.1, "beta: down-weighting of elements far from the token's median")
    nf_clip: float = option(5.0, "cap on the variance factor nf")
    snr_draws: int = option(10, "noise draws per layer for the SNR estimate")
    calib_batch_size: int = option(0, "rows of the seeded SNR calibration batch; 0: per_device_train_batch_size")
    alpha: float = option(0.5, "weight of the clean CE in the hybrid loss; (1 - alpha) weighs the soft term")
    lam: float = option(0.1, "lambda: weight of the consistency KL(noisy 2 || noisy 1)")
    temperature: float = option(1.0, "T: softmax temperature of the clean teacher")
    double_sigma: bool = option(False, "v1 quirk: the training noise base is sigma^2 * std(h) (selection uses sigma)")
    shift_mask: bool = option(True, "False: v1 bug, the soft/consistency mask labels != -100 is one position off")
    detach_teacher: bool = option(False, "v2: detach the teacher and the consistency target, temper all sides by T, "
                                         "soft term times T^2")
    detach_noise_scale: bool = option(False, "v2: add the noise as a detached offset (identity gradient through h)")
    seed: int = option(0, "seed of the calibration batch and of every noise draw")
    chunk_size: int = option(256, "positions per chunk of the chunked LM head / KL computation")
    recompute_logits: Literal["auto", "always", "never"] = option(
        "auto", "recompute each chunk's logits in backward instead of keeping them for it; auto: when the three "
                "branches' fp32 logits at the loss positions would exceed 256 MiB (large vocabularies)")

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        for name in ("noise_std", "beta", "lam"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0 or self.nf_clip <= 0:
            raise ValueError("temperature and nf_clip must be > 0")
        if self.snr_draws < 1 or self.chunk_size < 1 or self.calib_batch_size < 0:
            raise ValueError("snr_draws and chunk_size must be >= 1, calib_batch_size >= 0")
        try:
            re.compile(self.layers)
        except re.error as err:
            raise ValueError(f"layers is not a valid regex: {err}") from None


@register("noisefit")
class NoiseFiT(Regularizer):
    """NoiseFiT (arXiv 2504.03302): adaptive noise on SNR-selected layers, trained with the hybrid loss."""

    options_cls = NoiseFiTOptions
    order = Order.OBJECTIVE
    # it replaces the causal-LM loss of the Trainer and SFTTrainer; DPO / GRPO losses are not a token CE
    requires = Requirements(trainers=("hf", "sft"))

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.selected: list[int] | None = None  # positions among all decoder layers
        self.snr: list[float] = []
        self._trainer: Any = None
        self._layers: list[tuple[str, torch.nn.Module]] = []
        self._candidates: list[int] = []
        self._rows: int | None = None  # rows per branch of the armed stacked forward; None: hooks are off
        self._key = (0, 0)  # (optimizer step, shard) of the current micro-batch
        self._micro = (-1, -1)  # (optimizer step, micro-step index)
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    # -- setup and layer selection ----------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, trainer: Any) -> None:
        self._trainer = trainer
        if trainer is not None:
            _check_trainer(trainer)
        self._layers = internals.decoder_layers(model)
        pattern = re.compile(self.options.layers) if self.options.layers else None
        self._candidates = [i for i, (name, _) in enumerate(self._layers) if pattern is None or pattern.search(name)]
        if not self._candidates:
            raise ConfigError(f"noisefit: layers={self.options.layers!r} matches none of the {len(self._layers)} "
                              f"decoder layers (e.g. '{self._layers[0][0]}')")
        if self.options.num_layers > len(self._candidates):
            raise ConfigError(f"noisefit: num_layers={self.options.num_layers} but only {len(self._candidates)} "
                              "candidate decoder layers")
        self._body = internals.backbone(model)
        self._lm_head = model.get_output_embeddings()
        if self._lm_head is None:
            raise ConfigError(f"noisefit: {type(model).__name__} has no output embeddings (LM head)")
        self._keep_one = internals.accepts_logits_to_keep(model)

    def on_prepared(self, model: torch.nn.Module, shards: Any) -> None:
        if self.selected is None:
            size = self.options.calib_batch_size or self._trainer.args.per_device_train_batch_size
            gen = torch.Generator().manual_seed(draw_seed("calib", self.options.seed))
            self.select(model, internals.calibration_batch(self._trainer, size, gen))
        self._install_hooks()

    def select(self, model: torch.nn.Module, batch: dict[str, Any]) -> list[int]:
        """Score every candidate layer on `batch` (eval mode, no grad) and keep the top / bottom k.

        Every rank runs the forward (under ZeRO-3 the parameter gathers are collective) on the same seeded batch
        with the same seeded draws; rank 0's choice is then broadcast so the ranks cannot disagree."""
        scores: dict[int, torch.Tensor] = {}
        opts = self.options

        def capture(index):
            def hook(module, args, output):
                h = output if torch.is_tensor(output) else output[0]
                scores[index] = layer_snr(h, opts.noise_std, opts.beta, opts.nf_clip, opts.snr_draws, opts.seed, index)
            return hook

        handles = [self._layers[i][1].register_forward_hook(capture(i)) for i in self._candidates]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(**_model_inputs(batch), **self._forward_kwargs())
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        snr = torch.stack([scores[i] for i in self._candidates]).cpu()
        picked = [self._candidates[j] for j in select_layers(snr, opts.num_layers, opts.select)]
        self.selected = _broadcast(picked)
        self.snr = snr.tolist()
        logger.info("noisefit: SNR %s; noise on layers %s (%s SNR)", [round(s, 3) for s in self.snr],
                    self.selected, opts.select)
        return self.selected

    def _install_hooks(self) -> None:
        self.teardown()
        for index in self.selected:
            self.add_hook(self._layers[index][1].register_forward_hook(self._noise_hook(index)))

    def _forward_kwargs(self) -> dict[str, Any]:
        # only the final hidden states are used: skip the [rows, T, V] logits of the model's own head
        return {"use_cache": False, **({"logits_to_keep": 1} if self._keep_one else {})}

    # -- training ---------------------------------------------------------------------------------------------
    def _noise_hook(self, layer: int):
        opts = self.options

        def hook(module, args, output):
            # off in eval mode, under no_grad (generate, evaluation) and outside the stacked training forward
            if self._rows is None or not module.training or not torch.is_grad_enabled():
                return None
            h = output if torch.is_tensor(output) else output[0]
            rows = self._rows
            if h.dim() != 3 or h.shape[0] != 3 * rows:
                raise RuntimeError(f"noisefit: layer {layer} returned shape {tuple(h.shape)}, expected "
                                   f"[{3 * rows}, T, d] (clean + 2 noisy branches of {rows} rows)")
            parts = [h[:rows]]
            for branch in (1, 2):
                hb = h[branch * rows:(branch + 1) * rows]
                eps = standard_normal(hb.shape, hb.device, *training_noise_key(opts.seed, *self._key, layer, branch))
                base = branch_base(hb, opts.noise_std, opts.double_sigma)
                parts.append(adaptive_noise(hb, eps, base, opts.beta, opts.nf_clip, opts.detach_noise_scale))
            noisy = torch.cat(parts, dim=0)
            return noisy if torch.is_tensor(output) else (noisy, *output[1:])

        return hook

    def training_loss(self, ctx: LossContext) -> torch.Tensor:
        opts = self.options
        labels = ctx.inputs["labels"]
        rows = labels.shape[0]
        self._advance(ctx.trainer)
        stacked = {k: _repeat3(v, rows) for k, v in _model_inputs(ctx.inputs).items()}
        captured: dict[str, torch.Tensor] = {}
        handle = self._body.register_forward_hook(
            lambda m, a, out: captured.__setitem__("h", internals.final_hidden(out)))
        self._rows = rows  # armed until post_step: a checkpointed layer re-runs its hook during backward
        try:
            ctx.model(**stacked, **self._forward_kwargs())
        finally:
            handle.remove()
        hidden = captured["h"].split(rows, dim=0)
        pos = positions(labels, opts.shift_mask)
        sums = hybrid_sums(hidden, pos, self._lm_head, opts.temperature, opts.detach_teacher, opts.chunk_size,
                           self._recompute(pos.rows.numel()))
        out = hybrid_loss(sums, opts.alpha, opts.lam, ctx.token_mean, ctx.ga_divisor)
        for key in ("ce", "soft", "consistency"):
            value = out[key].detach()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count += 1
        return out["loss"]

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

    # -- logging and state ------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        out = {k: float(v) / max(self._count, 1) for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        if self.selected is not None:
            out["num_noisy_layers"] = float(len(self.selected))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"selected": list(self.selected or []), "snr": list(self.snr)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "selected" not in state:
            raise ValueError("noisefit: the checkpoint's state has no selected layers")
        self.selected, self.snr = list(state["selected"]), list(state.get("snr", []))
        if self._layers and self._hook_handles:  # already training: move the hooks to the saved layers
            self._install_hooks()


def _check_trainer(trainer: Any) -> None:
    """What the replaced loss cannot honour, refused before training."""
    args = trainer.args
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ConfigError("noisefit replaces the training loss; it cannot be combined with compute_loss_func")
    if getattr(args, "label_smoothing_factor", 0.0):
        raise ConfigError("noisefit: label_smoothing_factor must be 0 (its CE is the plain token-mean NLL)")
    if getattr(args, "loss_type", "nll") != "nll":
        raise ConfigError(f"noisefit: loss_type={args.loss_type!r} is not supported; use 'nll'")
    if getattr(args, "padding_free", False):
        raise ConfigError("noisefit stacks the batch three times along the batch dimension; padding_free is not "
                          "supported")


def _model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k not in ("labels", "use_cache", "num_items_in_batch")}


def _repeat3(value: Any, rows: int) -> Any:
    if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == rows:
        return torch.cat([value, value, value], dim=0)
    if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == 1 and rows > 1:
        return value  # broadcast along the batch (e.g. shared position_ids)
    raise ConfigError(f"noisefit: cannot stack model input of shape {tuple(getattr(value, 'shape', ()))} for "
                      f"{rows} rows")


def _broadcast(picked: list[int]) -> list[int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [picked]
        dist.broadcast_object_list(box, src=0)
        if box[0] != picked:
            logger.warning("noisefit: this rank scored layers %s, rank 0 chose %s; using rank 0's", picked, box[0])
        return list(box[0])
    return picked
