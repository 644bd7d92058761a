"""Why l2_sp costs ~10% of a CPU step, and what a leaner `pre_step` would cost.

    python benchmarks/l2_sp_prestep_profile.py [--size tiny|default] [--overhead] [--steps N]

Compares `L2SP.pre_step` as shipped with a proposed formulation that gives the
same gradient edit and penalty (checked here) with one temporary per tensor
instead of five:

    diff = theta - anchor                       # the only temporary
    sq  += torch.dot(diff, diff)                # penalty without a squared copy
    grad.add_(diff, alpha=lam * grad_scale)     # no `lam * diff`, no `delta * scale` copy

The shipped version allocates `theta - anchor` twice, `.pow(2)`, `lam * diff`
and, in `ShardAccess.add_to_grad`, `delta * grad_scale()` even when the scale
is 1, so it streams ~7 full fp32 copies of the model per step through memory.

The proposed class is registered as `l2_sp_proposed` in this process only (it
is not part of llmreg). `--overhead` then runs `step_overhead.py` with vanilla,
l2_sp and l2_sp_proposed interleaved, and reports each variant's in-training
pre_step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llmreg import register  # noqa: E402
from llmreg.core.shards import ShardAccess  # noqa: E402
from llmreg.data import tiny_llama  # noqa: E402
from llmreg.regularizers.l2_sp import L2SP  # noqa: E402


@register("l2_sp_proposed")
class L2SPProposed(L2SP):
    """L2SP with the suggested pre_step (plain / DDP layout only: it writes p.grad directly)."""

    @torch.no_grad()
    def pre_step(self, shards: ShardAccess) -> None:
        lam = self.options.lam
        scale = shards._grad_scale()
        sq = torch.zeros(())
        for name, p in shards.named_parameters():
            anchor = self.anchors.get(name)
            if anchor is None:
                continue
            diff = shards.local_param(p) - anchor
            sq = sq.to(diff.device) + torch.dot(diff, diff)
            if lam != 0.0:
                # in llmreg this would be shards.add_to_grad(p, diff, alpha=lam)
                p.grad.view(-1).add_(diff, alpha=lam * scale)
        self._penalty = 0.5 * lam * float(shards.all_reduce_sum(sq))


def _prepared(cls, size: str, lam: float = 0.01):
    model = tiny_llama(size=size, seed=0)
    shards = ShardAccess.from_model(model)
    reg = cls(lam=lam)
    reg.on_prepared(model, shards)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
            p.grad = torch.randn(p.shape, generator=gen)
    return model, shards, reg


def check_equivalent(size: str) -> None:
    (m0, s0, r0), (m1, s1, r1) = _prepared(L2SP, size, lam=0.3), _prepared(L2SPProposed, size, lam=0.3)
    r0.pre_step(s0)
    r1.pre_step(s1)
    worst = max((a.grad - b.grad).abs().max().item() for a, b in zip(m0.parameters(), m1.parameters()))
    rel = abs(r0._penalty - r1._penalty) / max(abs(r0._penalty), 1e-12)
    print(f"equivalence: max |grad difference| {worst:.2e}, penalty relative difference {rel:.2e}")
    assert worst < 1e-4 and rel < 1e-4


def microbench(size: str, repeats: int = 15) -> None:
    for cls in (L2SP, L2SPProposed, L2SP, L2SPProposed):
        model, shards, reg = _prepared(cls, size)
        reg.pre_step(shards)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            reg.pre_step(shards)
            times.append(time.perf_counter() - t0)
        n = sum(p.numel() for p in model.parameters())
        print(f"{cls.__name__:13s} pre_step on {n / 1e6:.1f}M params: median {1000 * statistics.median(times):6.1f} ms, "
              f"min {1000 * min(times):6.1f} ms")


def overhead(size: str, steps: int) -> None:
    import step_overhead

    spent: dict[str, list[float]] = {}

    def timed(cls):
        original = cls.__dict__["pre_step"]

        def wrapper(self, shards):
            t0 = time.perf_counter()
            original(self, shards)
            spent.setdefault(cls.__name__, []).append(time.perf_counter() - t0)

        cls.pre_step = wrapper

    timed(L2SP)
    timed(L2SPProposed)
    step_overhead.main(["--size", size, "--steps", str(steps), "--only", "l2_sp", "l2_sp_proposed"])
    for name, times in spent.items():
        print(f"{name:13s} pre_step inside training: median {1000 * statistics.median(times):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "default"), default="default")
    parser.add_argument("--overhead", action="store_true", help="also run the interleaved step benchmark")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    check_equivalent("tiny")
    microbench(args.size)
    if args.overhead:
        overhead(args.size, args.steps)


if __name__ == "__main__":
    main()
