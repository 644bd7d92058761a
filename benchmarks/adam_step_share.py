"""How long `torch.optim.AdamW.step` takes on SmolLM2-135M's parameter shapes, for all weights and for the share
half_ft trains (issue 18's half_ft step-time floor, benchmarks/RESULTS.md). No model is loaded: zero weights of
the same shapes and random gradients; 2 torch threads, median of 5 steps after 2.

    python benchmarks/adam_step_share.py [--trainable 0.607]
"""

from __future__ import annotations

import argparse
import time

import torch

# SmolLM2-135M: hidden 576, MLP 1536, 30 layers, 3 KV heads of 64, 49152-token vocabulary, tied embedding
HIDDEN, MLP, LAYERS, KV, VOCAB = 576, 1536, 30, 192, 49152


def shapes() -> list[tuple[int, ...]]:
    attention = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN)]
    layer = attention + [(MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]
    return [(VOCAB, HIDDEN)] + (layer + [(HIDDEN,), (HIDDEN,)]) * LAYERS + [(HIDDEN,)]


def adam_step_ms(trainable: float) -> tuple[int, int, float]:
    """(all weights, trained weights, median ms of one AdamW.step); the embedding is always trained (as half_ft
    keeps it), then decoder tensors in order until `trainable` of all weights."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes()]
    total = sum(p.numel() for p in params)
    trained, count = [params[0]], params[0].numel()
    for p in params[1:]:
        if count < trainable * total:
            trained.append(p)
            count += p.numel()
    for p in trained:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(trained, lr=1e-4)
    for _ in range(2):  # the first steps allocate Adam's state
        opt.step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return total, count, sorted(times)[2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trainable", type=float, default=0.607, help="half_ft's optimizer-state ratio on SmolLM2")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for share in (1.0, args.trainable):
        total, count, ms = adam_step_ms(share)
        print(f"weights {total / 1e6:.1f}M trained {count / 1e6:.1f}M AdamW.step median {ms:.0f} ms")


if __name__ == "__main__":
    main()
