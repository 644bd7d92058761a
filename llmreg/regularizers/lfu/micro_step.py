"""The hook state of one LfU micro-step: which forward is running (the host's clean one, the ascent one, the
perturbed one), the auxiliary tensors each forward adds, and the hidden states captured along the way.

A forward is recognised by this state and, for a checkpoint recompute that runs outside every forward, by its
batch size: the host batch has `host_rows` rows, the perturbed batch of the `stacked` plan one row more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

HOST, ASCENT, PERTURBED = "host", "ascent", "perturbed"  # the forwards of one micro-step


@dataclass
class MicroStep:
    """Hook state of one micro-step (a new one at every gradient-enabled training forward of the top model)."""

    host_rows: int | None = None  # batch size of the host's clean forward
    perturbed_rows: int | None = None  # batch size that marks the perturbed forward (stacked plan)
    running: str | None = None  # HOST | ASCENT | PERTURBED while one of those forwards runs
    zero_leaves: dict[Any, torch.Tensor] = field(default_factory=dict)  # zero aux tensors of the clean pass, by key
    delta: dict[Any, torch.Tensor] = field(default_factory=dict)  # the ascent step, same keys
    host_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # -1: embeddings, 0..L-1 layers
    perturbed_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    autocast: tuple | None = None  # (device type, dtype) when the host forward ran under autocast


class MicroStepTracker:
    """Opens a `MicroStep` at each host forward and answers the hooks: which auxiliary tensor to add, where a
    hidden state goes."""

    def __init__(self) -> None:
        self.step = MicroStep()
        self.ascent_active = [False]  # True only while the ascent gradient is taken (read by ZeroAuxLinear)

    # -- hooks on the top model ---------------------------------------------------------------------------
    def open_host(self, module: torch.nn.Module, args: Any) -> None:
        """Forward pre-hook of the top model: a gradient-enabled training forward starts a new micro-step."""
        if self.step.running is not None or not (module.training and torch.is_grad_enabled()):
            return
        self.step = MicroStep(running=HOST)

    def close_host(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.step.running == HOST:
            self.step.running = None

    # -- what the hooks ask -------------------------------------------------------------------------------
    def aux_value(self, key: Any, rows: int, make: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """The auxiliary tensor this call adds: delta in the perturbed branch (or its recompute), a zero leaf in
        the clean pass (created on first use, reused by its recompute), None outside training."""
        st = self.step
        if st.running == PERTURBED or (
            st.running is None and st.perturbed_rows is not None and rows == st.perturbed_rows
        ):
            return st.delta.get(key)
        if st.running in (HOST, ASCENT):
            if st.running == HOST:
                st.host_rows = rows
            leaf = st.zero_leaves.get(key)
            if leaf is None:
                leaf = st.zero_leaves[key] = make().requires_grad_(True)
            return leaf
        if st.running is None and torch.is_grad_enabled() and rows == st.host_rows:
            return st.zero_leaves.get(key)  # checkpoint recompute of the clean pass
        return None

    def capture(self, index: int, h: torch.Tensor) -> None:
        """Keep a layer's output (-1: the embedding output) of the host or the perturbed forward."""
        if self.step.running == HOST:
            self.step.host_hidden[index] = h
        elif self.step.running == PERTURBED:
            self.step.perturbed_hidden[index] = h

    def embedding_hook(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the first decoder layer: its input is the embedding output."""
        h = args[0] if args else kwargs.get("hidden_states")
        if torch.is_tensor(h):
            self.capture(-1, h)

    # -- the forwards LfU runs itself ---------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self, forward: str) -> Iterator[MicroStep]:
        """Mark `forward` (ASCENT or PERTURBED) as running in the current micro-step, under the host's autocast."""
        st = self.step
        st.running = forward
        try:
            with same_autocast(st.autocast):
                yield st
        finally:
            st.running = None

    @contextlib.contextmanager
    def taking_ascent_gradient(self) -> Iterator[None]:
        self.ascent_active[0] = True
        try:
            yield
        finally:
            self.ascent_active[0] = False


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden state of a decoder layer's output (a tensor, or a tuple / list starting with it)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """The layer output with its hidden state replaced."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


def autocast_state(device_type: str) -> tuple | None:
    """(device type, dtype) when autocast is on for `device_type`, else None."""
    if torch.is_autocast_enabled(device_type):
        return device_type, torch.get_autocast_dtype(device_type)
    return None


def same_autocast(state: tuple | None) -> contextlib.AbstractContextManager:
    """accelerate's mixed precision wraps the top model's forward in autocast; LfU's own forwards bypass that
    wrapper, so they re-enter the autocast the host forward ran under."""
    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=state[0], dtype=state[1])
