"""The ranges of the trainer fields HF / TRL accept, checked in validation (before a model loads).

A value outside them either fails late, with a traceback after the model is loaded (learning_rate=-1 in torch's
optimizer, per_device_train_batch_size=0 in the DataLoader), or trains silently wrong (max_steps=0 saves an
untrained "final" model, save_steps=0). Only fields of the kind's config class are checked; a field missing
from this table is passed through as before. Steps fields may be a ratio of the run (0 < x < 1) in HF, so
they need > 0, not >= 1.
"""

from __future__ import annotations

from typing import Any

from llmreg.core.options import ConfigError, check_range

_POSITIVE = {"gt": 0}
_NON_NEGATIVE = {"ge": 0}
_AT_LEAST_ONE = {"ge": 1}
_UNIT = {"ge": 0, "le": 1}

TRAINER_RANGES: dict[str, dict[str, Any]] = {
    "learning_rate": {"gt": 0, "warn_above": 1},
    "per_device_train_batch_size": _AT_LEAST_ONE,
    "per_device_eval_batch_size": _AT_LEAST_ONE,
    "gradient_accumulation_steps": _AT_LEAST_ONE,
    "eval_accumulation_steps": _AT_LEAST_ONE,
    "num_train_epochs": _POSITIVE,
    "save_steps": _POSITIVE,
    "logging_steps": _POSITIVE,
    "eval_steps": _POSITIVE,
    "save_total_limit": _NON_NEGATIVE,  # 0 or None: keep every checkpoint
    "warmup_steps": _NON_NEGATIVE,
    "warmup_ratio": _UNIT,
    "weight_decay": {"ge": 0, "warn_above": 10},
    "max_grad_norm": _NON_NEGATIVE,
    "adam_beta1": {"ge": 0, "lt": 1},
    "adam_beta2": {"ge": 0, "lt": 1},
    "adam_epsilon": _NON_NEGATIVE,
    "seed": _NON_NEGATIVE,
    "data_seed": _NON_NEGATIVE,
    "dataloader_num_workers": _NON_NEGATIVE,
    # TRL
    "max_length": _AT_LEAST_ONE,
    "max_prompt_length": _AT_LEAST_ONE,
    "max_completion_length": _AT_LEAST_ONE,
    "num_generations": {"ge": 2},  # GRPO's advantages are relative to the other completions of a prompt
    "generation_batch_size": _AT_LEAST_ONE,
    "num_iterations": _AT_LEAST_ONE,
    "steps_per_generation": _AT_LEAST_ONE,
    "beta": _NON_NEGATIVE,
    "epsilon": _NON_NEGATIVE,
    "temperature": _POSITIVE,
    "top_p": {"gt": 0, "le": 1},
    "label_smoothing": _UNIT,
}


def check_trainer_ranges(args: dict[str, Any], where: str = "trainer") -> None:
    """Raise a one-line ConfigError for the first field of `args` out of its range (see TRAINER_RANGES)."""
    max_steps = args.get("max_steps")
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise ConfigError(f"{where}: max_steps must be >= 1, or -1 to train num_train_epochs, got {max_steps!r}")
    for key, value in args.items():
        if key in TRAINER_RANGES:
            check_range(value, TRAINER_RANGES[key], key, where)
