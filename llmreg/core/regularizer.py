"""The `Regularizer` base class and the training loop it plugs into.

Every method in llmreg is a `Regularizer`: a small stateful object that hooks
named points of the host trainer's loop (the pattern of MosaicML Composer's
"algorithms on events"). The loop, as the trainer mixin runs it:

    setup(model, trainer)        before the optimizer / DeepSpeed engine exist:
                                 model surgery, freezing, loading anchors
    param_groups(named_params)   weight-decay / learning-rate groups; the stack
                                 merges them and asserts they partition the
                                 trainable parameters
    on_prepared(model, shards)   after accelerate / DeepSpeed wrapped the model;
                                 `shards` reads each rank's local partition
    (GRPO adds two hooks per generation batch through its own protocol:
     `llmreg.integrations.trl.GRPOHookRegularizer`)
    for each micro-batch:
        (forward hooks)          registered by the regularizer in setup /
                                 on_prepared through `self.add_hook(handle)`
        training_loss(ctx)       optional, at most one regularizer per stack:
                                 replaces the host's own training loss (and its
                                 forward), for methods that must change the
                                 forward itself (NoiseFiT's stacked clean +
                                 noisy branches). It returns the loss in the
                                 host's units: token-sum terms through
                                 `ctx.token_mean`, per-micro-batch means divided
                                 by `ctx.ga_divisor` (see `LossContext`)
        loss_terms(ctx)          extra objective terms, scaled like the host
                                 trainer's own loss under gradient accumulation
        backward                 exactly once per micro-step
    at the accumulation boundary:
        pre_step(shards)         gradient edits on local shards, after backward
                                 and before clipping / the optimizer step
                                 (under DeepSpeed through the backward shim)
        optimizer.step
        post_step(shards)        decoupled updates after the optimizer step
    metrics()                    logged as reg/<name>/<key>
    state_dict()/load_state_dict()  saved with every checkpoint, per rank; on resume
                                 loaded after on_prepared, or before the optimizer
                                 is built when `loads_state_early`

Hooks run in the stack's order (see `stack.py`). A regularizer declares what it
needs in `requires` (trainer kinds, ZeRO-3, PEFT, model outputs); the stack
checks the combination before training starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from llmreg.core.options import build_options

if TYPE_CHECKING:  # pragma: no cover
    from llmreg.core.shards import ShardAccess

TRAINER_KINDS = ("hf", "sft", "dpo", "grpo")


class Order:
    """Where a regularizer sits in the stack. Lower runs first in every hook.

    Structural changes must come before freezing (a frozen multiplier is still
    a multiplier), freezing before parameter groups (groups only hold trainable
    tensors), and objective terms before gradient edits.
    """

    SURGERY = 0
    FREEZE = 10
    PARAM_GROUPS = 20
    OBJECTIVE = 30
    GRADIENT_EDIT = 40


@dataclass(frozen=True)
class Requirements:
    """What a regularizer needs from the host trainer; checked up front."""

    trainers: tuple[str, ...] = TRAINER_KINDS
    supports_zero3: bool = True
    supports_peft: bool = True
    needs_outputs: bool = False  # compute_loss must return the model outputs


@dataclass
class LossContext:
    """What `training_loss` and `loss_terms` see for one micro-batch.

    `loss` / `outputs` are None in `training_loss` (the host has not run). `ga_divisor` is what a
    per-micro-batch mean must be divided by to match the host loss under gradient accumulation;
    `token_mean(token_sum, token_count)` normalises a sum over label tokens the way the host's own
    causal-LM loss is normalised (over the accumulation window with `num_items_in_batch`, else over
    the micro-batch's `token_count`).
    """

    model: torch.nn.Module
    inputs: dict[str, Any]
    loss: torch.Tensor | None
    outputs: Any
    trainer: Any
    num_items_in_batch: Any = None
    # trainer-specific tensors of this micro-batch's forward (GRPO: per_token_logps, entropies; see
    # llmreg.integrations.trl)
    extras: dict[str, Any] = field(default_factory=dict)
    ga_divisor: int = 1
    token_mean: Any = None  # Callable[[Tensor, Tensor], Tensor]; set by the trainer mixin


@dataclass
class NoOptions:
    """A regularizer without options."""


class Regularizer:
    """Base class. Subclasses set `options_cls` (a dataclass with `help`
    metadata), `order` and `requires`, and override the hooks they need.

    `name` is set by `llmreg.register`.
    """

    name: ClassVar[str] = "regularizer"
    options_cls: ClassVar[type] = NoOptions
    order: ClassVar[int] = Order.OBJECTIVE
    requires: ClassVar[Requirements] = Requirements()
    # On resume, state is loaded after `on_prepared` (it may hold local shards). A regularizer whose
    # state decides what the optimizer holds (a frozen set) sets this to load it before the optimizer exists.
    loads_state_early: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.options = build_options(self.options_cls, options, where=self.name)
        self._hook_handles: list[Any] = []

    # -- hooks; defaults do nothing ------------------------------------------------
    def setup(self, model: torch.nn.Module, trainer: Any) -> None:
        """Before the optimizer and the DeepSpeed engine exist."""

    def param_groups(self, named_params: list[tuple[str, torch.nn.Parameter]]) -> list[dict] | None:
        """Return groups `{"names": [...], <optimizer options>}` over some of
        the trainable parameters, or None to leave grouping alone."""
        return None

    def on_prepared(self, model: torch.nn.Module, shards: ShardAccess) -> None:
        """After accelerate / DeepSpeed wrapped the model."""

    def training_loss(self, ctx: LossContext) -> torch.Tensor | None:
        """Replace the host trainer's training loss for this micro-batch (None: leave it to the host).

        Only one regularizer of a stack may override this, and it cannot be combined with one that
        `needs_outputs`. The returned loss is in the host's units (see `LossContext`); other
        regularizers' `loss_terms` are still added to it.
        """
        return None

    def loss_terms(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        """Extra terms added to the micro-batch loss (already weighted)."""
        return {}

    def pre_step(self, shards: ShardAccess) -> None:
        """Gradient edits, between backward and the optimizer step."""

    def pop_grad_norm(self) -> float | None:
        """The pre-clip global gradient norm over all trainable parameters, if `pre_step` computed it this
        step (then the trainer reports it instead of computing the same norm again); None otherwise."""
        return None

    def post_step(self, shards: ShardAccess) -> None:
        """Decoupled updates after the optimizer step."""

    def metrics(self) -> dict[str, float]:
        """Values to log, as {key: number}; logged as reg/<name>/<key>."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name}: got state {sorted(state)} but it keeps none")

    # -- helpers -------------------------------------------------------------------
    def add_hook(self, handle: Any) -> None:
        """Keep a hook handle so `teardown` removes it."""
        self._hook_handles.append(handle)

    def teardown(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    def overrides(self, hook: str) -> bool:
        """True when this class implements `hook` itself (the stack skips work otherwise)."""
        return getattr(type(self), hook) is not getattr(Regularizer, hook)

    def __repr__(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options))
        return f"{type(self).__name__}({opts})"


def option(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    warn_above: float | None = None,
    **kwargs: Any,
) -> Any:
    """A dataclass field with help text, for regularizer options.

    `ge` / `gt` / `le` / `lt` bound a numeric value (each item of a list), checked before anything loads
    (llmreg.core.options.check_range) and shown by `llmreg list`; `warn_above`: a legal value beyond it is
    probably a typo (lam=1e30) and gets a one-line warning."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("warn_above", warn_above))}
    metadata = {"help": help, **{k: v for k, v in bounds.items() if v is not None}}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)
