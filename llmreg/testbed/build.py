"""Build (or load from cache) the testbed's small "pretrained" model.

A Llama-style model trained from scratch, offline and deterministically, on a mixed
corpus of the old skills (`skills.OLD_SKILLS`). Plain torch loop with AdamW (warmup,
then cosine decay), one uniform mixture of skills per batch.

Loss on answer tokens only (plus the terminating newline): the prompts of copy,
reverse and sort are random letters, which no model can predict, so a loss on them
only adds noise and slows learning; the answer-only loss is also what the fine-tuning
stage uses (completion-only), so pre-training and fine-tuning optimise the same thing.

The artifact (model, tokenizer, `scores.json`, `testbed.json` with the build config)
lives outside the repository: `$LLMREG_CACHE/testbed/<hash>` or
`~/.cache/llmreg/testbed/<hash>`, the hash taken over the build config, so a second
call with the same config loads it instead of training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llmreg.testbed.skills as S

BUILD_VERSION = 1
# model sizes: "tiny" for tests (seconds), "small" the real testbed
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    ),
    "small": dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
    ),
}
DEFAULTS: dict[str, Any] = dict(
    size="small",
    steps=1500,
    batch_size=64,
    lr=1e-3,
    warmup=100,
    weight_decay=0.0,
    skills=list(S.OLD_SKILLS),
    eval_n=200,
    table_seed=0,
)
MAX_NEW_TOKENS = 8
# named builds a recipe can ask for (`model: {testbed: default}`); a mapping of options is the other way
PRESETS: dict[str, dict[str, Any]] = {"default": {}}


def default_cache_root() -> Path:
    root = os.environ.get("LLMREG_CACHE")
    return Path(root) / "testbed" if root else Path.home() / ".cache" / "llmreg" / "testbed"


def build_config(seed: int = 0, **overrides: Any) -> dict[str, Any]:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown build options {sorted(unknown)}; choose from {sorted(DEFAULTS)}")
    cfg = dict(DEFAULTS, **overrides, seed=seed, version=BUILD_VERSION)
    if cfg["size"] not in SIZES:
        raise ValueError(f"unknown size {cfg['size']!r}; choose from {sorted(SIZES)}")
    cfg["skills"] = list(cfg["skills"])
    cfg["model"] = dict(SIZES[cfg["size"]])  # in the hash, so editing a size rebuilds
    return cfg


def check_build_options(spec: str | dict[str, Any]) -> dict[str, Any]:
    """The `build()` keyword arguments a recipe's `model.testbed` names, checked without building anything.

    `spec` is a preset name (`PRESETS`, e.g. "default") or a mapping of `seed` and any of `DEFAULTS`
    (e.g. `{size: tiny, steps: 20}`, the rest as in the default build). Returns `{"seed": ..., **overrides}`,
    which is also a valid `spec` (a resolved recipe loads again). ValueError names the closest valid
    preset, option or size.
    """
    from llmreg.core.options import did_you_mean as hint

    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(
                f"unknown testbed {spec!r}{hint(spec, PRESETS)} (presets: {', '.join(PRESETS)}; "
                f"or a mapping of build options: seed, {', '.join(DEFAULTS)})"
            )
        spec = PRESETS[spec]
    if not isinstance(spec, dict):
        raise ValueError(f"expected a preset name or a mapping of build options, got {spec!r}")
    options = dict(spec)
    seed = options.pop("seed", 0)
    for key, value in options.items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown build option {key!r}{hint(key, [*DEFAULTS, 'seed'])}")
        _check_type(key, value, type(DEFAULTS[key]))
    _check_type("seed", seed, int)
    if options.get("size", DEFAULTS["size"]) not in SIZES:
        size = options["size"]
        raise ValueError(f"unknown size {size!r}{hint(str(size), SIZES)} (sizes: {', '.join(SIZES)})")
    unknown_skills = set(options.get("skills", ())) - set(S.SKILLS)
    if unknown_skills:
        bad = sorted(unknown_skills)[0]
        raise ValueError(f"unknown skill {bad!r}{hint(bad, S.SKILLS)} (skills: {', '.join(S.SKILLS)})")
    return {"seed": seed, **options}


def _check_type(key: str, value: Any, expected: type) -> None:
    accepted = (int, float) if expected is float else expected  # YAML writes 1e-3 as a float, 0 as an int
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ValueError(f"{key}: expected {expected.__name__}, got {value!r}")


def config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def make_model(size: str, vocab_size: int, seed: int):
    from llmreg.data.tiny import tiny_llama

    return tiny_llama("tiny", seed=seed, vocab_size=vocab_size, max_position_embeddings=64, **SIZES[size])


def encode(tokenizer, examples: list[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of `<s> prompt answer \\n` and labels masking `<s>` and the prompt with -100."""
    ids, labels = [], []
    for prompt, answer in examples:
        p = tokenizer(prompt)["input_ids"]  # starts with <s>
        a = tokenizer(answer + "\n", add_special_tokens=False)["input_ids"]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    return ids, labels


def pad_batch(ids: list[list[int]], labels: list[list[int]], pad_id: int):
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    lab = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return input_ids, mask, lab


def evaluate_all(
    model, tokenizer, skill_names: list[str] | None = None, eval_n: int = 200, table_seed: int = 0
) -> dict[str, float]:
    """Exact match of `model` on each skill's held-out eval set (default: every skill, old and new)."""
    names = list(skill_names) if skill_names is not None else list(S.SKILLS)
    return {
        s: S.exact_match(
            model,
            tokenizer,
            S.make_examples(s, eval_n, seed=0, split="eval", table_seed=table_seed),
            max_new_tokens=MAX_NEW_TOKENS,
        )
        for s in names
    }


def train(cfg: dict[str, Any], log: Callable[[str], None] = print):
    """Pre-train a fresh model on the mixed corpus of `cfg["skills"]`; returns (model, tokenizer)."""
    import torch

    # one thread: CPU kernels give bit-identical results for the same thread count only, and on
    # 2 shared cores one thread was also the faster (about 0.2 s/step for "small", 2 threads under load 0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: dict[str, Any], log: Callable[[str], None]):
    import math
    import random

    import torch

    from llmreg.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(model_max_length=64)
    model = make_model(cfg["size"], len(tok), cfg["seed"])
    steps, bs, names = cfg["steps"], cfg["batch_size"], cfg["skills"]
    per_skill = steps * bs // len(names) + bs
    pool: list[tuple[str, str]] = []
    for i, s in enumerate(names):
        pool += S.make_examples(s, per_skill, seed=cfg["seed"] * 1000 + i, split="train", table_seed=cfg["table_seed"])
    random.Random(cfg["seed"]).shuffle(pool)
    ids, labels = encode(tok, pool)

    torch.manual_seed(cfg["seed"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"],
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < cfg["warmup"]:
            return (step + 1) / cfg["warmup"]
        frac = (step - cfg["warmup"]) / max(1, steps - cfg["warmup"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.time()
    for step in range(steps):
        sl = slice(step * bs, (step + 1) * bs)
        input_ids, mask, lab = pad_batch(ids[sl], labels[sl], tok.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step == 0:
            log(
                f"step {step + 1}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{time.time() - t0:.0f}s"
            )
    model.eval()
    return model, tok


def build(
    cache_dir: str | os.PathLike | None = None, seed: int = 0, log: Callable[[str], None] = print, **overrides: Any
) -> Path:
    """Path of the testbed artifact for this config, training it first if it is not cached.

    `overrides`: any of `DEFAULTS` (`steps`, `size`, `batch_size`, `lr`, ...). The directory
    holds the model and tokenizer (`from_pretrained` works on it), `scores.json` (exact match
    per skill, the new skill included) and `testbed.json` (the config and build time).
    """
    from transformers import AutoTokenizer  # noqa: F401  (fail early if transformers is missing)

    cfg = build_config(seed=seed, **overrides)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    out = root / config_hash(cfg)
    if (out / "testbed.json").exists():
        return out
    t0 = time.time()
    model, tok = train(cfg, log=log)
    train_s = time.time() - t0
    scores = evaluate_all(
        model, tok, list(cfg["skills"]) + [S.NEW_SKILL], eval_n=cfg["eval_n"], table_seed=cfg["table_seed"]
    )
    log(f"scores {json.dumps(scores)}")
    tmp = root / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "scores.json").write_text(json.dumps(scores, indent=2, sort_keys=True))
    (tmp / "testbed.json").write_text(
        json.dumps(
            dict(config=cfg, train_seconds=round(train_s, 1), total_seconds=round(time.time() - t0, 1)), indent=2
        )
    )
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load(path: str | os.PathLike):
    """(model, tokenizer, scores) of a built testbed directory."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path)
    model = LlamaForCausalLM.from_pretrained(path)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok, json.loads((path / "scores.json").read_text())
