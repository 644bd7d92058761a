"""Ensembles of K independently trained checkpoints, evaluated as one model (arXiv 2509.14786, section C).

Combination rules, per position, in fp32 (always report which one was used):

- `logits` (default): zbar = (1/K) sum_k z_k; the ensemble's log-probabilities are log_softmax(zbar)
  (a normalised product of experts);
- `probs`: log p(y) = logsumexp_k log_softmax(z_k)[y] - log K (the mixture of the members'
  distributions; its loss is never worse than the mean member loss).

`combined_log_scores` returns, for both rules, scores whose log_softmax is the ensemble's log-probabilities
(the mean logits, or the mixture's log-probabilities themselves, which log_softmax leaves unchanged). So
`EnsembleCausalLM` can stand in for a causal LM wherever logits are read: the validation loss here, and
lm-eval's HFLM (`evaluate_ensemble_suite`), which applies log_softmax to the logits it gets.

Memory: the members' outputs are accumulated one member at a time (a running sum of logits, or a running
logaddexp of log-probabilities), so only one member's logits and the accumulator are alive per batch.
All members stay loaded (fine for the CPU-sized models here); for 8B members, evaluate one member at a
time on the same batches, or one member per GPU (spec section 4) -- not implemented here.
The reference evaluation rule (Levanter branch suhas/eval-ensemble) was not compared (spec section 8).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from llmreg.core.options import ConfigError

COMBINE = ("logits", "probs")


def check_combine(combine: str) -> None:
    if combine not in COMBINE:
        raise ConfigError(f"ensemble combine: unknown value {combine!r} (one of {', '.join(COMBINE)})")


def combined_log_scores(member_logits: Iterable[torch.Tensor], combine: str = "logits") -> torch.Tensor:
    """Ensemble scores (fp32) from each member's logits; log_softmax of the result is the ensemble's
    log-probability under `combine` (see the module docstring)."""
    check_combine(combine)
    acc, k = None, 0
    for z in member_logits:
        z = z.float()
        term = z if combine == "logits" else torch.log_softmax(z, dim=-1)
        acc = term if acc is None else (acc + term if combine == "logits" else torch.logaddexp(acc, term))
        k += 1
    if acc is None:
        raise ValueError("an ensemble needs at least one member")
    return acc / k if combine == "logits" else acc - math.log(k)


class EnsembleCausalLM(torch.nn.Module):
    """K causal LMs as one: `forward(input_ids, attention_mask)` returns the combined scores as `.logits`."""

    def __init__(self, members: Sequence[torch.nn.Module], combine: str = "logits") -> None:
        super().__init__()
        check_combine(combine)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        vocab = {m.config.vocab_size for m in members}
        if len(vocab) != 1:
            raise ConfigError(f"ensemble members have different vocabularies: {sorted(vocab)}")
        self.members = torch.nn.ModuleList(members)
        self.combine = combine
        self.config = members[0].config  # lm-eval reads vocab_size, model_type, max_position_embeddings
        self.name_or_path = f"ensemble-{len(members)}-{combine}"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tie_weights(self, *args, **kwargs) -> None:  # lm-eval calls it on any model it gets
        for member in self.members:
            member.tie_weights()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutput

        scores = combined_log_scores(
            (m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits for m in self.members),
            self.combine,
        )
        return CausalLMOutput(logits=scores)


def check_member_paths(paths: Sequence[str]) -> None:
    """Every member is a model folder, all with one vocabulary; read from config.json only (no weights)."""
    if not paths:
        raise ConfigError("ensemble: give at least one member")
    vocabs = {}
    for path in paths:
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise ConfigError(f"ensemble: no model folder (config.json) at {path}")
        with open(cfg) as f:
            vocabs[path] = json.load(f).get("vocab_size")
    if len(set(vocabs.values())) != 1:
        raise ConfigError(f"ensemble: members have different vocabularies: {vocabs}")


def load_members(paths: Sequence[str]) -> list[torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    check_member_paths(paths)
    return [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in paths]


@torch.no_grad()
def validation_loss(model: torch.nn.Module, blocks: Sequence[Sequence[int]], batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats per predicted token) over full blocks; `model` may be an
    `EnsembleCausalLM` or any causal LM."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = torch.as_tensor(np.asarray(blocks[i : i + batch_size]), dtype=torch.long, device=_device(model))
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        total += nll.sum().item()
        count += nll.numel()
    if count == 0:
        raise ValueError("validation_loss: no blocks")
    return total / count


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate_ensemble_suite(
    suite, member_paths: Sequence[str], combine: str = "logits", limit: int | None = None, batch_size: int = 4
):
    """lm-eval scores of the ensemble on a suite (llmreg.eval.run.evaluate_suite with the ensemble model)."""
    from transformers import AutoTokenizer

    from llmreg.eval.run import evaluate_suite
    from llmreg.eval.suite import load_suite

    check_combine(combine)
    suite = load_suite(suite) if isinstance(suite, (str, os.PathLike)) else suite  # checked before any load
    check_member_paths(member_paths)
    tokenizer = AutoTokenizer.from_pretrained(member_paths[0])
    model = EnsembleCausalLM(load_members(member_paths), combine)
    return evaluate_suite(suite, model, tokenizer=tokenizer, limit=limit, batch_size=batch_size)
