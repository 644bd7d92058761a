"""Next-token entropy and NLL of several models on held-out paragraphs, with the paired difference to the first.

Why (issue 18): a run whose held-out perplexity rises can have learnt wrong preferences or have flattened every
distribution; the mean entropy of the next-token distribution tells the two apart (NoiseFiT v1's non-detached KL
terms flatten, benchmarks/RESULTS.md). The paragraphs are the suite's held-out ones: the last `--last` non-blank
lines of the text file (eval/tasks/tinystories_heldout_ppl.yaml), the first `--paragraphs` of them.

    M=../shared/data/models/smollm2-135m-instruct
    python benchmarks/heldout_entropy.py base=$M/SmolLM2-135M-Instruct.Q4_1.gguf \\
        vanilla=/work/bench_runs/forgetting_real/smollm2/vanilla-<hash>/final

A model is NAME=PATH: a model folder, or a .gguf file (converted once through llmreg's GGUF cache). Each paragraph
is scored as its own sequence (no BOS added beyond what the tokenizer adds), up to --max-tokens tokens. The models
must share one tokenizer (the differences are per paragraph and per token).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "eval" / "tasks"))
from forgetting_real_matrix import TINYSTORIES  # noqa: E402
from llmreg_tasks import HELDOUT_LINES  # noqa: E402  (the suite's held-out paragraphs: the last 200)

from llmreg.eval.paired import paired_se  # noqa: E402
from llmreg.recipe.gguf import gguf_model_folder  # noqa: E402


def entropy_and_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, float, int]:
    """Sums over the predicted positions of one sequence: next-token entropy (nats), NLL of the actual next token,
    and the number of positions. logits [T, V] for ids [T]."""
    logp = logits[:-1].float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    nll = -logp.gather(1, ids[1:, None]).squeeze(1)
    return float(entropy.sum()), float(nll.sum()), int(nll.numel())


def heldout_paragraphs(path: Path, last: int, count: int) -> list[str]:
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    return lines[-last:][:count]


def load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_model_folder(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def score(model, tokenizer, paragraphs: list[str], max_tokens: int) -> list[tuple[float, float, int]]:
    out = []
    with torch.no_grad():
        for text in paragraphs:
            ids = tokenizer(text, return_tensors="pt").input_ids[0, :max_tokens]
            out.append(entropy_and_nll(model(ids[None]).logits[0], ids))
    return out


def paired_per_token(a: list[tuple[float, float, int]], b: list[tuple[float, float, int]], k: int):
    """Mean over paragraphs of (b - a) per token for field k (0 entropy, 1 NLL), and its paired SE (nan for one
    paragraph)."""
    per_a, per_b = [x[k] / x[2] for x in a], [y[k] / x[2] for x, y in zip(a, b)]
    se = paired_se(per_a, per_b)
    return (sum(per_b) - sum(per_a)) / len(per_a), float("nan") if se is None else se


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="+", help="NAME=PATH (a model folder or a .gguf file); the first is the reference"
    )
    parser.add_argument("--text", type=Path, default=TINYSTORIES)
    parser.add_argument(
        "--last", type=int, default=HELDOUT_LINES, help="the held-out paragraphs: the last N non-blank lines"
    )
    parser.add_argument("--paragraphs", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    if any("=" not in m for m in args.models):
        parser.error("each model is NAME=PATH")
    paragraphs = heldout_paragraphs(args.text, args.last, args.paragraphs)
    first = None
    print("| model | entropy (nats/token) | NLL (nats/token) | entropy - first (paired SE) | NLL - first (paired SE) |")
    print("|---|---|---|---|---|")
    for spec in args.models:
        name, path = spec.split("=", 1)
        model, tokenizer = load(path)
        scores = score(model, tokenizer, paragraphs, args.max_tokens)
        first = first or scores
        tokens = sum(s[2] for s in scores)
        cells = [f"{sum(s[k] for s in scores) / tokens:.3f}" for k in (0, 1)]
        diffs = [paired_per_token(first, scores, k) for k in (0, 1)]
        cells += [f"{m:+.3f} ± {se:.3f}" for m, se in diffs]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{len(paragraphs)} paragraphs of {args.text} (the last {args.last} non-blank lines), {tokens} positions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
