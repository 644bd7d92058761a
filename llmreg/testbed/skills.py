"""Synthetic skills for the forgetting testbed: pure generators and a batched exact-match scorer.

Every example is a short line `prompt + answer + "\\n"` for the char-level tokenizer
(`llmreg.data.tokenizer`, one token per character, so digits are single tokens).
A one-letter tag starts each prompt so the model knows which skill is asked:

- `copy`:    "C:kfqz="  -> "kfqz"       (3-6 random letters)
- `reverse`: "R:kfqz="  -> "zqfk"       (3-5 random letters)
- `sort`:    "S:kfqz="  -> "fkqz"       (3-5 random letters)
- `add`:     "A:37+8="  -> "45"         (0-99 + 0-99)
- `recall`:  "K:qwe="   -> "381"        (a fixed table of `TABLE_SIZE` key -> value facts, drawn from `table_seed`)
- `sub`:     "M:37-8="  -> "29"         (the NEW skill, fine-tuning target; a >= b, so answers are >= 0)

Train/eval split: an example belongs to eval when a hash of its prompt falls in the
bottom `EVAL_FRACTION` (by content, independent of the sampling seed), so eval
prompts never appear in any train sample. `recall` is the exception by nature: it
is memorisation of a fixed table, so its eval set is the table itself (every
fact, asked once) and its train samples are draws from the same table.
"""

from __future__ import annotations

import hashlib
import random
import string

OLD_SKILLS = ("copy", "reverse", "sort", "add", "recall")
NEW_SKILL = "sub"
SKILLS = OLD_SKILLS + (NEW_SKILL,)
EVAL_FRACTION = 0.1
TABLE_SIZE = 40
LETTERS = string.ascii_lowercase


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def fact_table(table_seed: int = 0, size: int = TABLE_SIZE) -> dict[str, str]:
    """The fixed key -> value table of the `recall` skill: 3-letter keys, 3-digit values."""
    rng = random.Random(f"facts-{table_seed}")
    table: dict[str, str] = {}
    while len(table) < size:
        key = "".join(rng.choice(LETTERS) for _ in range(3))
        table.setdefault(key, str(rng.randint(100, 999)))
    return table


def _sample(skill: str, rng: random.Random) -> tuple[str, str]:
    if skill == "copy":
        w = _word(rng, 3, 6)
        return f"C:{w}=", w
    if skill == "reverse":
        w = _word(rng, 3, 5)
        return f"R:{w}=", w[::-1]
    if skill == "sort":
        w = _word(rng, 3, 5)
        return f"S:{w}=", "".join(sorted(w))
    if skill == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"A:{a}+{b}=", str(a + b)
    if skill == "sub":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        a, b = max(a, b), min(a, b)
        return f"M:{a}-{b}=", str(a - b)
    raise ValueError(f"unknown skill {skill!r}; choose from {SKILLS}")


def is_eval(prompt: str) -> bool:
    """Whether `prompt` belongs to the held-out split (by content, so splits are disjoint for every seed)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h < EVAL_FRACTION * 2**64


def make_examples(
    skill: str, n: int, seed: int = 0, split: str = "train", table_seed: int = 0
) -> list[tuple[str, str]]:
    """`n` (prompt, answer) pairs of `skill` from `split` ("train" or "eval"), identical for the same arguments.

    Eval sets are drawn without repetition (their spaces are large except `add`/`sub`'s
    ~1000 eval pairs, and `recall`, whose eval set is the whole table, `n` ignored beyond it).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if skill == "recall":
        table = fact_table(table_seed)
        if split == "eval":
            return [(f"K:{k}=", v) for k, v in list(table.items())[:n]]
        rng = random.Random(f"{skill}-{seed}-{split}")
        keys = list(table)
        return [(f"K:{k}=", table[k]) for k in (rng.choice(keys) for _ in range(n))]
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; choose from {SKILLS}")
    rng = random.Random(f"{skill}-{seed}-{split}")
    want_eval = split == "eval"
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * (n + 10):
            raise ValueError(f"cannot draw {n} distinct {split} examples of {skill!r}")
        prompt, answer = _sample(skill, rng)
        if is_eval(prompt) != want_eval:
            continue
        if want_eval:
            if prompt in seen:
                continue
            seen.add(prompt)
        out.append((prompt, answer))
    return out


def eval_dataset(skill: str, eval_n: int = 200, table_seed: int = 0):
    """The held-out examples of `skill` as a `datasets.DatasetDict` with a "test" split of {prompt, answer} rows:
    what `evaluate_all` scores, in the form an lm-eval task's `custom_dataset` returns."""
    from datasets import Dataset, DatasetDict

    examples = make_examples(skill, eval_n, seed=0, split="eval", table_seed=table_seed)
    return DatasetDict(
        {"test": Dataset.from_dict({"prompt": [p for p, _ in examples], "answer": [a for _, a in examples]})}
    )


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side
    newline = tokenizer.convert_tokens_to_ids("\n")
    with torch.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[newline, tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.split("\n", 1)[0] for t in texts]


def exact_match(
    model, tokenizer, examples: list[tuple[str, str]], max_new_tokens: int = 8, batch_size: int = 256
) -> float:
    """Fraction of examples whose greedy continuation, up to the first newline, equals the answer.

    Batched generation with left padding; `model` needs only a HF-style `generate`.
    """
    if not examples:
        raise ValueError("no examples to score")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    hits = 0
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            preds = _generate(model, tokenizer, [p for p, _ in chunk], max_new_tokens)
            hits += sum(pred == ans for pred, (_, ans) in zip(preds, chunk))
    finally:
        if was_training:
            model.train()
    return hits / len(examples)
