"""Each rank's local view of trainable parameters and their gradients.

Weight penalties and gradient edits must work on what a rank actually owns
(docs/architecture.md, trap 3):

- plain / DDP: the whole parameter and its `.grad`;
- DeepSpeed ZeRO-1/2: the fragment of the fp32 master partition linked to the
  parameter (`param._hp_mapping`) and the matching slice of the reduced
  gradient partition; a parameter with no fragment on this rank is skipped;
- DeepSpeed ZeRO-3: `deepspeed.utils.safe_get_local_fp32_param`,
  `safe_get_local_grad` and `safe_set_local_grad`.

Every tensor handed out is 1-D and fp32, so a regularizer keeps its anchors and
importances in the same flat local layout and never gathers a full weight.
Gradients read here are in the optimizer's units: under fp16 loss scaling the
edit is multiplied by the current loss scale so it survives the unscale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from llmreg.core.anatomy import full_shape
from llmreg.core.dist import is_distributed


def zero_stage_of(model: torch.nn.Module) -> int:
    """0 without DeepSpeed, else the ZeRO stage of the engine wrapping `model`."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return 3
    if any(hasattr(p, "_hp_mapping") for p in model.parameters()):
        return 2
    return 0


def zero3_unpadded(p: torch.nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition `local` of `p` without the tail that pads the last partition (no weight)."""
    size = p.ds_tensor.ds_numel
    return local[: max(0, min(size, p.ds_numel - size * dist.get_rank()))]


class ShardAccess:
    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        zero_stage: int,
        grad_scale: Callable[[], float] = lambda: 1.0,
    ) -> None:
        self.zero_stage = zero_stage
        self._grad_scale = grad_scale
        self._trainable = [(n, p) for n, p in named_params if p.requires_grad]
        self._named = [(n, p) for n, p in self._trainable if self._owns(p)]

    @classmethod
    def from_model(cls, model: torch.nn.Module, grad_scale: Callable[[], float] = lambda: 1.0) -> ShardAccess:
        return cls(list(model.named_parameters()), zero_stage_of(model), grad_scale)

    def _owns(self, p: torch.nn.Parameter) -> bool:
        if self.zero_stage == 2:
            return getattr(p, "_hp_mapping", None) is not None
        return True

    # -- iteration -------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """Trainable parameters that have a local shard on this rank."""
        return iter(self._named)

    def trainable_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """Every trainable parameter, also those with no shard here (ZeRO-2): for collectives every rank joins."""
        return iter(self._trainable)

    def owns(self, p: torch.nn.Parameter) -> bool:
        return self._owns(p)

    # -- values --------------------------------------------------------------------
    def local_param(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The local fp32 values of `p`, 1-D. Do not write to it."""
        if self.zero_stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p).detach().reshape(-1)
        if self.zero_stage == 2:
            return p._hp_mapping.get_hp_fragment().detach().reshape(-1)
        return p.detach().reshape(-1).float()

    def local_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """The local gradient of `p` (1-D, in the units the optimizer will see), or None."""
        grad = self._raw_grad(p)
        if grad is None:
            return None
        scale = self._grad_scale()
        grad = grad.reshape(-1).float()
        return grad if scale == 1.0 else grad / scale

    @torch.no_grad()
    def add_to_grad(self, p: torch.nn.Parameter, delta: torch.Tensor, alpha: float = 1.0) -> None:
        """grad(p) += alpha * delta, in place on the local shard (delta is 1-D, fp32, unscaled)."""
        alpha = alpha * self._grad_scale()
        if self.zero_stage == 3:
            from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

            grad = safe_get_local_grad(p)
            grad.view(-1).add_(delta.to(grad.dtype), alpha=alpha)
            safe_set_local_grad(p, grad)  # the getter may hand out a copy (offload, swapping)
            return
        if self.zero_stage == 2:
            frag = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
            frag.view(-1).add_(delta.to(frag.dtype), alpha=alpha)
            return
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.view(-1).add_(delta.to(p.grad.dtype), alpha=alpha)

    def _raw_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        if self.zero_stage == 3:
            from deepspeed.utils import safe_get_local_grad

            return safe_get_local_grad(p)
        if self.zero_stage == 2:
            return p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
        return p.grad

    # -- full tensors <-> local shards ----------------------------------------------------
    def local_slice(self, p: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """The part of a full-size tensor shaped like `p` (importance, a gradient) that lines up with this
        rank's local shard of `p`: 1-D, same length as `local_param(p)` (ZeRO-3 pads the last partition)."""
        flat = full.reshape(-1)
        if self.zero_stage == 3:
            size = p.ds_tensor.ds_numel
            start = size * dist.get_rank()
            piece = flat[start : start + size]
            if piece.numel() < size:
                piece = torch.cat([piece, piece.new_zeros(size - piece.numel())])
            return piece
        if self.zero_stage == 2:
            address = p._hp_mapping.lp_fragment_address
            return flat.narrow(0, address.start, address.numel)
        return flat

    def without_padding(self, p: torch.nn.Parameter, local: torch.Tensor) -> torch.Tensor:
        """`local` without the tail ZeRO-3 pads the last partition with (those elements are no weight)."""
        return zero3_unpadded(p, local) if self.zero_stage == 3 else local

    def full_shape(self, p: torch.nn.Parameter) -> torch.Size:
        """The shape of the whole parameter, also when ZeRO-3 has partitioned it."""
        return full_shape(p)

    def gather_full(self, p: torch.nn.Parameter, local: torch.Tensor | None) -> torch.Tensor:
        """Inverse of `local_slice`: the full tensor (shape of `p`, on every rank) from each rank's local piece.

        A one-off collective (used to write an artifact at the end of a phase), so it favours simplicity:
        each rank writes its piece into a zero buffer and the buffers are summed. Every rank must call it for
        every parameter of `trainable_parameters()`, in the same order; `local` is None where a ZeRO-2 rank
        holds no fragment of `p`.
        """
        shape = self.full_shape(p)
        numel = shape.numel()
        if self.zero_stage == 0:
            return local.reshape(shape).clone()
        size = numel if self.zero_stage == 2 else p.ds_tensor.ds_numel * dist.get_world_size()
        buffer = torch.zeros(size, dtype=torch.float32, device=p.device)
        if local is not None:
            if self.zero_stage == 3:
                part = p.ds_tensor.ds_numel
                buffer.narrow(0, part * dist.get_rank(), part).copy_(local)
            else:
                address = p._hp_mapping.lp_fragment_address
                buffer.narrow(0, address.start, address.numel).copy_(local)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer[:numel].reshape(shape)

    # -- reductions ------------------------------------------------------------------
    @property
    def is_sharded(self) -> bool:
        return self.zero_stage in (2, 3)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a per-rank partial (e.g. a penalty over local shards) across data-parallel ranks."""
        if self.is_sharded and is_distributed():
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value
