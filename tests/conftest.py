"""Shared builders: tiny models, local tokenizer and built-in data; no download anywhere."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.abspath(os.path.join(REPO, "..", "shared"))


@pytest.fixture(scope="session")
def tok():
    from llmreg.data import build_char_tokenizer

    return build_char_tokenizer()


def lm_dataset(tok, n: int = 64, length: int = 32, seed: int = 1):
    """Tokenised built-in arithmetic text, padded to one length (equal token counts per batch)."""
    from llmreg.data import make_builtin_dataset

    ds = make_builtin_dataset(num_examples=n, seed=seed)
    return ds.map(
        lambda b: tok(b["text"], padding="max_length", max_length=length, truncation=True),
        batched=True,
        remove_columns=["text"],
    )


def hf_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    base.update(kw)
    return TrainingArguments(**base)


def sft_args(out, **kw):
    """TRL's SFTConfig for the tests' tiny SFT runs (the SFT counterpart of `hf_args`); keywords override."""
    import trl

    base = dict(
        output_dir=str(out),
        max_length=48,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        activation_checkpointing=False,
        save_strategy="no",
    )
    base.update(kw)
    return trl.SFTConfig(**base)


def make_hf_trainer(tok, out, regularizers=(), model=None, trainer_cls=None, dataset=None, **kw):
    from transformers import DataCollatorForLanguageModeling

    from llmreg import RegTrainer
    from llmreg.data import tiny_llama

    cls = trainer_cls or RegTrainer
    extra = {} if cls is not RegTrainer and not issubclass(cls, RegTrainer) else {"regularizers": list(regularizers)}
    return cls(
        model=model if model is not None else tiny_llama(vocab_size=len(tok), seed=0),
        args=hf_args(out, **kw),
        train_dataset=dataset if dataset is not None else lm_dataset(tok),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        **extra,
    )


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)).item() for k in a)


def random_artifact(directory, model, **kw) -> str:
    """An importance artifact for `model` as it is now, with random Omega (see the library function)."""
    from llmreg.regularizers.forgetting.artifact import random_artifact as make

    return make(directory, model, **kw)


def edited_and_autograd_grads(model, tok, reg, shards, penalty_fn):
    """Gradients two ways on one batch: the data loss's backward followed by `reg.pre_step` (the edit), and
    autograd of the data loss plus `penalty_fn(model)` (the explicit penalty). Returns (edited, reference,
    penalty), the gradients of the trainable parameters by name."""
    batch = tok(["What is 1 + 2? Answer: 3"], return_tensors="pt")
    model.zero_grad()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    reg.pre_step(shards)
    edited = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    penalty = penalty_fn(model)
    (model(**batch, labels=batch["input_ids"]).loss + penalty).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return edited, reference, penalty
