"""Prefix sharing for NoiseFiT's stacked forward (spec option `noisefit_prefix_sharing`).

The three branches [clean; noisy 1; noisy 2] see the same rows until the first noisy layer, so the embeddings
and the layers up to that one run once on the plain batch. That layer's noise hook turns its output h into
[h; noisy 1; noisy 2] (`starts_branches` says whether the call belongs to the armed training forward), and a
forward pre-hook on every later layer (`stack_inputs`) stacks the per-row tensors the model passes to each
layer (attention mask, position ids, rotary tables) three times to match. Exact without dropout in the prefix
(`dropout_rate`); with it the branches would share one dropout mask there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def dropout_rate(module: torch.nn.Module) -> float:
    """A module's dropout probability: nn.Dropout's p, or an attention's `attention_dropout` / `dropout` rate."""
    if isinstance(module, torch.nn.modules.dropout._DropoutNd):
        return float(module.p)
    rates = [getattr(module, k, 0.0) for k in ("attention_dropout", "dropout", "dropout_p")]
    return max((float(r) for r in rates if isinstance(r, (int, float)) and not isinstance(r, bool)), default=0.0)


class SharedPrefix:
    """Hook state of prefix sharing; `armed_rows()` gives the rows per branch of the armed micro-batch or None."""

    def __init__(self, first_noisy_layer: int, armed_rows: Callable[[], int | None]) -> None:
        self.first = first_noisy_layer
        self._armed_rows = armed_rows
        self.in_training_forward = False  # set by the regularizer around its own model call
        self._layer_input: torch.Tensor | None = None  # the first noisy layer's input in that forward
        self._stacked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (per-row tensor, stacked)

    def reset(self) -> None:
        """Before each training forward and after the optimizer step (frees the stacked copies)."""
        self._stacked.clear()
        self._layer_input = None

    def starts_branches(self, layer_input: Any) -> bool:
        """Whether the first noisy layer's input belongs to the armed training forward: in that forward it is
        recorded; a gradient-checkpointing recomputation replays it (same storage, maybe a detached view)."""
        if not torch.is_tensor(layer_input):
            return False
        if self.in_training_forward:
            self._layer_input = layer_input
            return True
        ref = self._layer_input
        return ref is not None and ref.data_ptr() == layer_input.data_ptr() and ref.shape == layer_input.shape

    def stack_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook (with kwargs) of the layers after the first noisy one."""
        rows = self._armed_rows()
        if rows is None or not module.training or not torch.is_grad_enabled():
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not torch.is_tensor(hidden) or hidden.shape[0] != 3 * rows:
            return None
        return (
            args[:1] + tuple(self._stack(a, rows) for a in args[1:]),
            {k: (v if k == "hidden_states" else self._stack(v, rows)) for k, v in kwargs.items()},
        )

    def _stack(self, value: Any, rows: int) -> Any:
        """Per-row tensors (a batch dim of `rows`, at least 2-D) stacked three times, each once per forward;
        anything else (1-D cache positions, broadcast tensors, None) unchanged."""
        if isinstance(value, (tuple, list)):
            return type(value)(self._stack(v, rows) for v in value)
        if not torch.is_tensor(value) or value.dim() < 2 or value.shape[0] != rows:
            return value
        hit = self._stacked.get(id(value))
        if hit is None or hit[0] is not value:
            hit = (value, torch.cat([value, value, value], dim=0))
            self._stacked[id(value)] = hit  # keeps `value` alive, so its id is not reused within the forward
        return hit[1]
