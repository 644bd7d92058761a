"""KL to the base model: `lam * KL(p_base || p_theta)` per training token, the baseline users reach for first.

Reference: Shenfeld, Pari, Agrawal, "RL's Razor: Why Online Reinforcement Learning Forgets Less" (arXiv
2509.04259): the forward KL between the base and the fine-tuned model, measured on the new task's data, predicts
how much a fine-tune forgets. Penalising it during SFT is the regulariser form of that finding (and the SFT
analogue of the reference-KL of TRL's DPO / GRPO). There is no paper recipe for the penalty itself, hence no
paper default for `lam`: sweep it (`llmreg sweep ... --grid regularizers.0.lam=...`).

Per micro-batch, with h the policy's final hidden states (captured by a forward hook on the decoder body: TRL's
fused LM head gives no logits, docs/architecture.md trap 6) and h_b the base model's (one extra no-grad forward):

    kl = sum_{positions t} sum_v p_b(v | t) (log p_b(v | t) - log p_theta(v | t)) / #positions

over the positions that predict a real next token (`tokens: all`) or a trained one (`tokens: completion`:
labels != -100, the SFT completion). `direction: reverse` uses KL(p_theta || p_base). The logits are formed from
the hidden states in chunks of `chunk_size` positions, each recomputed in backward (`checkpoint`), so one chunk
of [positions x vocab] fp32 logits is alive at a time. The term is a per-micro-batch mean, scaled for gradient
accumulation by the stack like every loss term; across ranks the position count is averaged like the host's
token count (`average_tokens_across_devices`), so N processes train as one.

The base model:
- full fine-tuning: a frozen copy of the model as `setup` sees it (before the optimizer; after surgery and
  freezing regularizers ordered before it). Under ZeRO-3 the copy is built from the gathered parameters one
  tensor at a time and then partitioned by a DeepSpeed inference engine (as TRL prepares its reference
  models), so each rank keeps only its share; under ZeRO-2 and without DeepSpeed it is a full copy (ZeRO-2
  keeps full parameters on every rank anyway). Memory: one more copy of the weights, no optimizer state.
- PEFT: no copy; the same model with its adapters disabled (`PeftModel.disable_adapter()`).

Hooks: `setup` (copy or PEFT check, the capture hook), `on_prepared` (device / ZeRO-3 partitioning),
`loss_terms`, `metrics`. The logits are the model's own: the LM head, then the model's logit scaling /
softcapping (Gemma 2/3, Granite, Cohere; `llmreg.core.output_head`), for the policy and the base alike, also
when the host's full head output is reused. Departure: an LM head with a LoRA adapter is refused under PEFT
(the disabled-adapter base would not be the base there). MoE models: the host's loss keeps its router
load-balancing term (the KL is added to it; the base's forward is the body only, without router loss).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmreg.core import anatomy, dist
from llmreg.core.options import ConfigError, check_fields_in_range
from llmreg.core.output_head import logit_transform, with_transform
from llmreg.core.registry import register
from llmreg.core.regularizer import LossContext, Order, Regularizer, Requirements, option
from llmreg.core.running_mean import RunningMean

BODY_KEYS = ("input_ids", "attention_mask", "position_ids")


# -- the math -----------------------------------------------------------------------------------------------


def kl_positions(inputs: dict[str, Any], shape: torch.Size, tokens: str) -> torch.Tensor:
    """[B, T] bool: the positions t whose logits enter the KL (they predict token t + 1)."""
    mask = torch.zeros(shape, dtype=torch.bool, device=inputs["input_ids"].device)
    if tokens == "completion":
        labels = inputs.get("labels")
        if not torch.is_tensor(labels):
            raise ConfigError("kl_to_base: tokens 'completion' needs batches with labels")
        mask[:, :-1] = labels[:, 1:] != anatomy.IGNORE_INDEX
        return mask
    am = inputs.get("attention_mask")
    if torch.is_tensor(am) and am.dim() == 2:
        mask[:, :-1] = am[:, 1:].bool() & am[:, :-1].bool()
    else:
        mask[:, :-1] = True
    return mask


def _chunk_kl(rows: torch.Tensor, h_base: torch.Tensor, head, base_head, reverse: bool) -> torch.Tensor:
    # `head` turns the policy's rows into logits (the LM head, or only the output transform for host logits)
    logits = rows if head is None else head(rows)
    log_q = F.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(base_head(h_base).float(), dim=-1)
    if reverse:
        return (log_q.exp() * (log_q - log_p)).sum()
    return (log_p.exp() * (log_p - log_q)).sum()


def kl_sum(
    policy: torch.Tensor,
    base_hidden: torch.Tensor,
    head,
    base_head,
    reverse: bool = False,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Sum over rows of KL(p_base || p_theta) (or the reverse). `policy` [N, H] holds the policy's hidden states
    (then `head` forms its logits) or, with `head=None`, its final logits [N, V] already; `base_hidden` [N, H] and
    `base_head` give the base's. `chunk_size` rows of fp32 logits at a time; with more than one chunk each is
    recomputed in backward instead of kept (one chunk alone is kept: that costs no more memory than one chunk)."""
    total = policy.new_zeros((), dtype=torch.float32)
    recompute = torch.is_grad_enabled() and policy.requires_grad and policy.shape[0] > chunk_size
    for start in range(0, policy.shape[0], chunk_size):
        rows, hb = policy[start : start + chunk_size], base_hidden[start : start + chunk_size]
        if recompute:
            total = total + checkpoint(_chunk_kl, rows, hb, head, base_head, reverse, use_reentrant=False)
        else:
            total = total + _chunk_kl(rows, hb, head, base_head, reverse)
    return total


# -- the base model -----------------------------------------------------------------------------------------


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, hook-free copy of the plain model; built from gathered parameters when ZeRO-3 partitioned it."""
    plain = anatomy.unwrap(model)
    if any(hasattr(p, "ds_id") for p in plain.parameters()):
        import deepspeed

        twin = type(plain)(plain.config)  # outside zero.Init: full tensors, filled one gathered tensor at a time
        mine = dict(twin.named_parameters())
        for name, p in plain.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                mine[name].data.copy_(p.data)
        twin.to(next(iter(mine.values())).dtype)
    else:
        twin = copy.deepcopy(plain)
    for module in twin.modules():  # other regularizers' hooks must not run in the base's forward
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    twin.requires_grad_(False)
    return twin.eval()


def partition_for_inference(model: torch.nn.Module, trainer: Any) -> torch.nn.Module:
    """A ZeRO-3 inference engine over `model` with the trainer's DeepSpeed config (no optimizer or scheduler)."""
    import deepspeed

    config = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval() returns None
    return engine


# -- the regularizer ----------------------------------------------------------------------------------------


@dataclass
class KLToBaseOptions:
    lam: float = option(0.1, "strength of the KL term (no paper default: sweep it)", ge=0, warn_above=1e6)
    direction: Literal["forward", "reverse"] = option(
        "forward", "forward: KL(p_base || p_theta) (RL's Razor); reverse: KL(p_theta || p_base)"
    )
    tokens: Literal["all", "completion"] = option(
        "all", "all: every position that predicts a real token; completion: only trained ones (labels != -100)"
    )
    chunk_size: int = option(1024, "positions whose [positions x vocab] fp32 logits are formed at a time", ge=1)

    def __post_init__(self) -> None:
        check_fields_in_range(self)  # the declared ranges, also when the options are built directly


@register("kl_to_base")
class KLToBase(Regularizer):
    """`lam * KL(p_base || p_theta)` on the training tokens, the base a frozen copy (or the adapter disabled).

    Example::

        RegSFTTrainer(model=model, args=sft_config, train_dataset=ds, processing_class=tok,
                      regularizers=[{"name": "kl_to_base", "lam": 0.1}])
        # recipe: regularizers: [{name: kl_to_base, lam: 0.1, tokens: completion}]
    """

    options_cls = KLToBaseOptions
    order = Order.OBJECTIVE
    requires = Requirements(trainers=("hf", "sft"))

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._captured: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._in_base = False
        self._stats = RunningMean()
        self._base: torch.nn.Module | None = None

    def setup(self, model: torch.nn.Module, trainer: Any) -> None:
        from llmreg.integrations.trl import check_plain_lm_head

        reason = check_plain_lm_head(model)
        if reason:
            raise ConfigError(f"kl_to_base: {reason} (the logits are formed from the final hidden states)")
        self._trainer = trainer
        self._peft_model = model if anatomy.is_peft(model) else None
        self._head = anatomy.unwrap(model).get_output_embeddings()
        if self._peft_model is not None and hasattr(self._head, "lora_A"):
            raise ConfigError("kl_to_base: the LM head carries a LoRA adapter; leave lm_head out of target_modules")
        body = anatomy.decoder(model, where="kl_to_base")
        # PEFT: the base is this body and head with the adapter disabled; else a frozen copy (placed in on_prepared)
        self._base_body, self._base_head = body, self._head
        if self._peft_model is None:
            self._base = frozen_copy(model)
            self._base_body = anatomy.decoder(self._base, where="kl_to_base")
            self._base_head = self._base.get_output_embeddings()
        self._transform = logit_transform(anatomy.unwrap(model).config)
        # hidden states -> the model's logits (head, then its softcap / scaling), built once, not per micro-batch
        self._base_logits = with_transform(self._base_head, self._transform)
        self._head_logits = with_transform(self._head, self._transform)
        self.add_hook(body.register_forward_hook(self._capture))
        # where the host computes full logits (transformers.Trainer), reuse them instead of a second head GEMM
        # (the head module's output: before the model's logit transform, applied in loss_terms)
        self.add_hook(self._head.register_forward_hook(self._capture_logits))

    def _capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # the training forward only: not evaluation (no grad), not the base's own pass through this body (PEFT)
        if module.training and torch.is_grad_enabled() and not self._in_base:
            self._captured = anatomy.final_hidden(output)
            self._logits = None  # the head (if the host calls it) runs after the body

    def _capture_logits(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if module.training and torch.is_grad_enabled() and not self._in_base and torch.is_tensor(output):
            self._logits = output

    def on_prepared(self, model: torch.nn.Module, shards: Any) -> None:
        if self._base is None:
            return
        if shards.zero_stage == 3:
            self._base = partition_for_inference(self._base, self._trainer)
        else:
            self._base.to(next(anatomy.unwrap(model).parameters()).device)

    def _base_hidden(self, inputs: dict[str, Any]) -> torch.Tensor:
        kwargs = {k: inputs[k] for k in BODY_KEYS if torch.is_tensor(inputs.get(k))}
        self._in_base = True
        try:
            with torch.no_grad():
                if self._peft_model is not None:
                    with self._peft_model.disable_adapter():
                        out = self._base_body(**kwargs, use_cache=False)
                else:
                    out = self._base_body(**kwargs, use_cache=False)
        finally:
            self._in_base = False
        return anatomy.final_hidden(out)

    def loss_terms(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        hidden, self._captured = self._captured, None
        logits, self._logits = self._logits, None
        if hidden is None:
            raise RuntimeError("kl_to_base: the training forward did not pass through the decoder body")
        mask = kl_positions(ctx.inputs, hidden.shape[:2], self.options.tokens)
        base_hidden = self._base_hidden(ctx.inputs)
        # TRL's fused head never calls the LM head module: then the logits are formed here from the hidden states
        full_logits = logits is not None and logits.shape[:2] == hidden.shape[:2]
        self._in_base = True  # our own head calls below are not the host's forward
        try:
            total = kl_sum(
                logits[mask] if full_logits else hidden[mask],
                base_hidden[mask].to(hidden.dtype),
                self._policy_logits(full_logits),
                self._base_logits,
                reverse=self.options.direction == "reverse",
                chunk_size=self.options.chunk_size,
            )
        finally:
            self._in_base = False
        kl = total / self._position_count(mask)
        self._stats.add(kl_per_token=float(kl.detach()))
        return {"kl": self.options.lam * kl}

    def _policy_logits(self, from_host_logits: bool):
        """What turns the policy's rows into its logits: the head and the transform, or the transform alone on the
        host's head output (None: nothing, the identity)."""
        if from_host_logits:
            return None if self._transform.is_identity else self._transform
        return self._head_logits

    def _position_count(self, mask: torch.Tensor) -> torch.Tensor:
        """This micro-batch's positions; with `average_tokens_across_devices` the mean over ranks of theirs, so
        that DDP's gradient averaging gives the mean over every rank's positions, as one process would."""
        count = mask.sum().to(torch.float32).reshape(1)
        if dist.is_distributed() and getattr(self._trainer.args, "average_tokens_across_devices", False):
            count = dist.all_reduce_sum_(count) / dist.world_size()
        return count.squeeze(0).clamp(min=1)

    def metrics(self) -> dict[str, float]:
        return self._stats.pop()
