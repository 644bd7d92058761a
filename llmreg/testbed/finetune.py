"""Fine-tune a built testbed on a skill with `llmreg.RegTrainer`, with any stack of regularizers.

Same data encoding as pre-training (answer-only loss on `<s> prompt answer \\n`), a
constant learning rate, no weight decay in the optimizer (regularizers add their own),
so `regularizers=[]` is plain full fine-tuning and a regularizer's effect is the only
difference between two runs with the same seed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import llmreg.testbed.skills as S
from llmreg.testbed.build import encode, evaluate_all, load, pad_batch

__all__ = ["finetune", "evaluate_all", "skill_dataset"]


def skill_dataset(tokenizer, skill: str, n: int, seed: int = 0, table_seed: int = 0) -> list[dict[str, list[int]]]:
    ids, labels = encode(tokenizer, S.make_examples(skill, n, seed=seed, split="train", table_seed=table_seed))
    return [{"input_ids": x, "labels": y} for x, y in zip(ids, labels)]


class _Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        input_ids, mask, labels = pad_batch([r["input_ids"] for r in rows], [r["labels"] for r in rows], self.pad_id)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def finetune(
    model_dir: str | os.PathLike,
    skill: str = S.NEW_SKILL,
    steps: int = 800,
    lr: float = 1e-4,
    regularizers: Sequence[Any] = (),
    seed: int = 0,
    batch_size: int = 32,
    output_dir: str | None = None,
    callbacks: Sequence[Any] = (),
    **training_args: Any,
):
    """The model of `model_dir` after `steps` optimizer steps on `skill`'s train split; returns the model (eval mode).

    `regularizers`: what `RegTrainer(regularizers=...)` takes (objects, names or dicts).
    `callbacks`: `transformers.TrainerCallback`s (e.g. to evaluate along the way).
    `training_args`: extra `transformers.TrainingArguments` fields (they override the defaults here).
    """
    import transformers

    from llmreg.trainers import RegTrainer

    model, tok, _ = load(model_dir)
    data = skill_dataset(tok, skill, steps * batch_size, seed=seed + 1)
    with tempfile.TemporaryDirectory(prefix="llmreg-testbed-ft-") as tmp:
        kw: dict[str, Any] = dict(
            output_dir=output_dir or tmp,
            max_steps=steps,
            learning_rate=lr,
            per_device_train_batch_size=batch_size,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=seed,
            data_seed=seed,
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
        )
        kw.update(training_args)
        trainer = RegTrainer(
            model=model,
            args=transformers.TrainingArguments(**kw),
            train_dataset=data,
            data_collator=_Collator(tok.pad_token_id),
            regularizers=list(regularizers),
            callbacks=list(callbacks) or None,
        )
        trainer.train()
    model.eval()
    return model
