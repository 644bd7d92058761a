"""Rule-based verifiable rewards for RLVR (GRPO): exact numeric answers.

- `exact_answer_reward` (llmreg.data.builtin): the first number of the completion equals the `answer` column;
  for the built-in tasks and the testbed, whose models answer first.
- `numeric_answer_reward`: GSM8K-style. The gold answer is the number after the last `####` of the `answer`
  column (or the column itself); the prediction is the number after the completion's last `####`, else inside
  its last `\\boxed{}`, else its last number. Numbers compare by value, commas and a trailing period removed.
  1.0 when equal, else 0.0 (the paper's +1/-1 gives the same GRPO advantages after std normalisation, up to
  TRL's 1e-4 guard).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _to_number(text: str | None) -> float | None:
    if text is None:
        return None
    match = _NUMBER.search(text)
    if not match:
        return None
    try:
        return float(match.group().replace(",", "").rstrip("."))
    except ValueError:
        return None


def gold_number(answer: str) -> float | None:
    """The final number of a GSM8K answer ("... #### 72"), or of a bare answer ("72")."""
    answer = str(answer)
    return _to_number(answer.rsplit("####", 1)[1] if "####" in answer else answer)


def predicted_number(completion: str) -> float | None:
    if "####" in completion:
        return _to_number(completion.rsplit("####", 1)[1])
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    if boxed:
        return _to_number(boxed[-1])
    numbers = _NUMBER.findall(completion)
    return _to_number(numbers[-1]) if numbers else None


def numeric_answer_reward(completions: list, answer: list, **_: object) -> list[float]:
    rewards = []
    for completion, target in zip(completions, answer):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        gold, pred = gold_number(target), predicted_number(text)
        rewards.append(1.0 if gold is not None and pred is not None and abs(gold - pred) < 1e-6 else 0.0)
    return rewards
