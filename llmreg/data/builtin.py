"""Built-in synthetic tasks, generated locally from a seed.

`arithmetic`: "What is 23 + 58?" -> "81".
`testbed_<skill>`: the forgetting testbed's skills (`llmreg.testbed.skills`: copy, reverse,
sort, add, recall, and the new skill sub), train split, "M:37-8=" -> "29\\n". The completion
ends with the newline the testbed model stops on, and `prompt + completion` is exactly the
text `llmreg.testbed.finetune` trains on (with SFT, loss on the completion only, as there;
set `eos_token: "\\n"` in the SFT trainer section so TRL does not append `</s>`). The
`recall` facts are those of the default build (`table_seed` 0).
`testbed_general`: the old skills (all but sub) interleaved, the "general data" of the testbed,
e.g. for the importance phase of the forgetting penalty.

One generator serves every trainer kind through `format`:

- `text`:        {"text": prompt + " " + answer}            (Trainer, SFT)
- `prompt_completion`: {"prompt", "completion"}             (SFT, loss on the answer)
- `preference`:  {"prompt", "chosen", "rejected"}           (DPO; rejected is off by a small amount)
- `prompt_only`: {"prompt", "answer"}                       (GRPO with a verifiable reward)
"""

from __future__ import annotations

import random
from collections.abc import Callable

from llmreg.testbed.skills import OLD_SKILLS as TESTBED_OLD_SKILLS
from llmreg.testbed.skills import SKILLS as TESTBED_SKILLS
from llmreg.testbed.skills import make_examples

FORMATS = ("text", "prompt_completion", "preference", "prompt_only")


def _arithmetic_rows(n: int, seed: int, max_operand: int = 99) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-")
        answer = a + b if op == "+" else a - b
        wrong = answer + rng.choice([-3, -2, -1, 1, 2, 3])
        rows.append((f"What is {a} {op} {b}? Answer:", f" {answer}", f" {wrong}"))
    return rows


def _testbed_rows(skill: str) -> Callable[[int, int], list[tuple[str, str, str]]]:
    def rows(n: int, seed: int) -> list[tuple[str, str, str]]:
        rng = random.Random(f"rejected-{seed}")
        return [
            (prompt, answer + "\n", _corrupt(answer, rng) + "\n")
            for prompt, answer in make_examples(skill, n, seed=seed, split="train")
        ]

    return rows


def _testbed_general_rows(n: int, seed: int) -> list[tuple[str, str, str]]:
    """The old skills in turn (copy, reverse, sort, add, recall, copy, ...), each drawn with its own seed."""
    per_skill = -(-n // len(TESTBED_OLD_SKILLS))
    by_skill = [_testbed_rows(skill)(per_skill, seed) for skill in TESTBED_OLD_SKILLS]
    return [rows[i] for i in range(per_skill) for rows in by_skill][:n]


def _corrupt(answer: str, rng: random.Random) -> str:
    """A near miss for preference data: one character replaced by another of its kind (digit or letter)."""
    i = rng.randrange(len(answer))
    pool = "0123456789" if answer[i].isdigit() else "abcdefghijklmnopqrstuvwxyz"
    return answer[:i] + rng.choice(pool.replace(answer[i], "")) + answer[i + 1 :]


BUILTIN_TASKS: dict[str, Callable[..., list[tuple[str, str, str]]]] = {
    "arithmetic": _arithmetic_rows,
    **{f"testbed_{skill}": _testbed_rows(skill) for skill in TESTBED_SKILLS},
    "testbed_general": _testbed_general_rows,
}


def make_builtin_dataset(task: str = "arithmetic", format: str = "text", num_examples: int = 256, seed: int = 0):
    """A `datasets.Dataset` of `num_examples` rows of `task` in `format`."""
    from datasets import Dataset

    if task not in BUILTIN_TASKS:
        raise ValueError(f"unknown built-in task {task!r}; choose from {sorted(BUILTIN_TASKS)}")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {FORMATS}")
    rows = BUILTIN_TASKS[task](num_examples, seed)
    if format == "text":
        data = {"text": [p + c for p, c, _ in rows]}
    elif format == "prompt_completion":
        data = {"prompt": [p for p, _, _ in rows], "completion": [c for _, c, _ in rows]}
    elif format == "preference":
        data = {
            "prompt": [p for p, _, _ in rows],
            "chosen": [c for _, c, _ in rows],
            "rejected": [r for _, _, r in rows],
        }
    else:
        data = {"prompt": [p for p, _, _ in rows], "answer": [c.strip() for _, c, _ in rows]}
    return Dataset.from_dict(data)


def exact_answer_reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 when the first number in the completion equals the answer, else 0.0 (verifiable reward)."""
    import re

    rewards = []
    for completion, target in zip(completions, answer):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        match = re.search(r"-?\d+", text)
        rewards.append(1.0 if match and match.group() == str(target) else 0.0)
    return rewards
