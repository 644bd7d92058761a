"""EWC importance: the diagonal empirical Fisher on general data.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017 (arXiv 1612.00796);
spec shared/methods/forgetting.md section 2. F_i = (1/N) * sum_n (d l_n / d theta_i)^2 with l_n the
mean-token loss of one example (batch size 1), anchor = the weights the Fisher was measured at.

Hooks: none; this is a pass over data before fine-tuning, not a training-time regularizer. Under data
parallelism each process takes its own examples (the dataloader's sampler) and the squared-gradient sums
are all-reduced, so the per-example squares are never averaged across ranks first (spec section 5);
the model must fit on one device (no DeepSpeed: ZeRO partitions gradients and has no `no_sync`).

Departure from the EWC paper: it writes (lam / 2) * sum F (theta - theta*)^2; `forgetting_penalty`
uses lam * sum F (...)^2, so halve the paper's lambda when porting its values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

import llmreg.core.dist as dist


def fisher_importance(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    num_samples: int,
    names: list[str],
    loss_fn: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over up to `num_samples` single-example batches (all ranks together) of the squared gradient,
    divided by the number of examples seen; returns ({name: F}, examples used).

    `batches` must yield batches of one example; `loss_fn(model, batch)` gives its scalar loss (default:
    the model's own `.loss`). `names` are the parameter names to record, as `model.named_parameters()`
    spells them.
    """
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"fisher_importance: no parameter named {missing[0]}")
    world = dist.world_size()
    quota = -(-num_samples // world)  # this rank's share, rounded up; trimmed after the reduction
    device = next(model.parameters()).device
    sums = {n: torch.zeros(params[n].shape, dtype=torch.float32, device=device) for n in names}
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is
    seen = 0
    try:
        for batch in batches:
            if seen >= quota:
                break
            first = next(iter(batch.values()))
            if len(first) != 1:
                raise ValueError(f"fisher_importance needs batches of one example, got {len(first)}")
            model.zero_grad(set_to_none=True)
            loss_fn(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).backward()
            for name in names:
                grad = params[name].grad
                if grad is not None:
                    sums[name].add_(grad.detach().float().pow(2))
            seen += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    total = torch.tensor(float(seen), device=device)
    for value in (*sums.values(), total):
        dist.all_reduce_sum_(value)  # nothing in one process
    count = int(total.item())
    if count == 0:
        raise ValueError("fisher_importance: the data gave no example")
    return {n: s / count for n, s in sums.items()}, count
