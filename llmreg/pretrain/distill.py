"""Sequence-level distillation data (arXiv 2509.14786, section D): synthetic sequences sampled from a teacher
or an ensemble, mixed with the real blocks of a pre-training recipe (`data.pretrain.synthetic`).

Generation: unconditional, from BOS, temperature `temperature` (1.0), no top-k / top-p, `block_size - 1`
sampled tokens per sequence, so every sequence is one training block (sampling does not stop at EOS: an
EOS is kept and the model goes on, as in the packed real data where documents follow each other).
- `pooled` (default): an equal share of the sequences from each teacher (the first num_sequences % K
  teachers one more), pooled: a sequence-level mixture.
- `logit_average`: token by token from the logit-averaged ensemble (llmreg.pretrain.ensemble).
The corpus and its exact sampling parameters are written to `<output_dir>/synthetic/` (sequences.jsonl,
meta.json) and reused when the parameters match; only the main process generates.
Departure: the paper samples with vLLM; this is a plain KV-cached loop in torch (same distribution).

Mix: with R real blocks and a synthetic share w, each epoch holds the R real blocks plus S = round(R*w/(1-w))
synthetic ones (the pool cycled, in a seeded order, when it is smaller than S), so training for E epochs
takes E*R/(1-w) blocks, as the paper's 800*16/(1-w) steps; the trainer shuffles them together.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence

import numpy as np
import torch

from llmreg.core.options import ConfigError
from llmreg.pretrain.ensemble import combined_log_scores

SEQUENCES_FILE = "sequences.jsonl"
META_FILE = "meta.json"


@torch.no_grad()
def sample_sequences(
    members: Sequence[torch.nn.Module],
    num: int,
    length: int,
    bos_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 16,
    combine: str = "logits",
) -> list[list[int]]:
    """`num` sequences of `length` tokens (BOS + length-1 samples) from the members' combined distribution
    (one member: its own). KV caches per member; fp32 sampling."""
    out: list[list[int]] = []
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        seq = torch.full((b, 1), bos_id, dtype=torch.long)
        caches = [None] * len(members)
        step_input = seq
        for _ in range(length - 1):
            logits = []
            for k, m in enumerate(members):
                res = m(input_ids=step_input, past_key_values=caches[k], use_cache=True)
                caches[k] = res.past_key_values
                logits.append(res.logits[:, -1])
            scores = combined_log_scores(logits, combine) / temperature
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
            seq = torch.cat([seq, nxt], dim=1)
            step_input = nxt
        out.extend(seq.tolist())
    return out


def generate_corpus(
    teachers: Sequence[torch.nn.Module],
    num: int,
    length: int,
    bos_id: int,
    sampling: str = "pooled",
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[dict]:
    """[{"ids": [...], "teacher": k or "ensemble"}] of `num` sequences (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if sampling == "logit_average":
        seqs = sample_sequences(teachers, num, length, bos_id, temperature, gen, batch_size, combine="logits")
        return [{"ids": s, "teacher": "ensemble"} for s in seqs]
    k = len(teachers)
    rows = []
    for i, teacher in enumerate(teachers):
        share = num // k + (1 if i < num % k else 0)
        rows += [
            {"ids": s, "teacher": i}
            for s in sample_sequences([teacher], share, length, bos_id, temperature, gen, batch_size)
        ]
    return rows


def _meta(spec, block_size: int, vocab: int) -> dict:
    return {
        "teachers": list(spec.teachers),
        "sampling": spec.sampling,
        "temperature": spec.temperature,
        "top_k": None,
        "top_p": None,
        "num_sequences": spec.num_sequences,
        "seed": spec.seed,
        "length": block_size,
        "vocab_size": vocab,
        "start": "BOS",
    }


def synthetic_blocks(spec, block_size: int, tokenizer, cache_dir: str, args=None) -> list[list[int]]:
    """The synthetic blocks of `spec` (a SyntheticSpec): from the cache when its meta matches, else generated."""
    import contextlib

    meta = _meta(spec, block_size, len(tokenizer))
    guard = args.main_process_first(desc="generate synthetic data") if args is not None else contextlib.nullcontext()
    with guard:
        cached = _read_cache(cache_dir, meta)
        if cached is None:
            rows = generate_corpus(
                _load_teachers(spec.teachers, len(tokenizer)),
                spec.num_sequences,
                block_size,
                _bos(tokenizer),
                spec.sampling,
                spec.temperature,
                spec.seed,
                spec.batch_size,
            )
            _write_cache(cache_dir, meta, rows, tokenizer)
            cached = [r["ids"] for r in rows]
    return cached


def _bos(tokenizer) -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ConfigError("data.pretrain.synthetic: the tokenizer has neither a BOS nor an EOS token to start from")
    return bos


def _load_teachers(paths: Sequence[str], vocab: int) -> list[torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    teachers = []
    for path in paths:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if model.config.vocab_size < vocab:
            raise ConfigError(
                f"data.pretrain.synthetic.teachers: {path} has a vocabulary of "
                f"{model.config.vocab_size}, the tokenizer {vocab}; teachers and student share one"
            )
        teachers.append(model)
    return teachers


def _read_cache(cache_dir: str, meta: dict) -> list[list[int]] | None:
    meta_path, seq_path = os.path.join(cache_dir, META_FILE), os.path.join(cache_dir, SEQUENCES_FILE)
    if not (os.path.isfile(meta_path) and os.path.isfile(seq_path)):
        return None
    with open(meta_path) as f:
        if json.load(f) != meta:
            return None
    with open(seq_path) as f:
        return [json.loads(line)["ids"] for line in f if line.strip()]


def _write_cache(cache_dir: str, meta: dict, rows: list[dict], tokenizer) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, SEQUENCES_FILE), "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "text": tokenizer.decode(row["ids"])}) + "\n")
    with open(os.path.join(cache_dir, META_FILE), "w") as f:  # last: a half-written corpus has no meta
        json.dump(meta, f, indent=2)


def mix_blocks(real, synthetic: list[list[int]], fraction: float, seed: int = 0) -> np.ndarray:
    """The real blocks plus round(R*w/(1-w)) synthetic ones (see the module docstring)."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"synthetic fraction must be in (0, 1), got {fraction}")
    if not synthetic:
        raise ConfigError("data.pretrain.synthetic: no synthetic sequences")
    need = round(len(real) * fraction / (1.0 - fraction))
    rng = random.Random(seed)
    picked: list[list[int]] = []
    while len(picked) < need:
        order = list(range(len(synthetic)))
        rng.shuffle(order)
        picked += [synthetic[i] for i in order[: need - len(picked)]]
    return np.concatenate(
        [
            np.asarray(real, dtype=np.int32).reshape(-1, len(synthetic[0])),
            np.asarray(picked, dtype=np.int32).reshape(-1, len(synthetic[0])),
        ]
    )
