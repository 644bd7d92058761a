"""Extra loss terms follow the host trainer's gradient-accumulation convention (docs/architecture.md, trap 7).

A term that is a per-micro-batch mean must give the same update with GA=1 x batch 8 as with GA=4 x batch 2,
whether the trainer's own loss is normalised by the token count of the whole accumulated batch (Trainer with
a model that accepts `num_items_in_batch`, SFT) or divided by the number of accumulation steps (DPO).
"""

from __future__ import annotations

import pytest
import transformers
import trl
from conftest import lm_dataset, max_rel_diff, weights

import llmreg
from llmreg.core import Regularizer
from llmreg.data import build_char_tokenizer, make_builtin_dataset, tiny_llama


class EmbeddingEnergy(Regularizer):
    """lam * mean over rows of the mean squared input embedding of the row's real tokens."""

    def __init__(self, lam: float) -> None:
        super().__init__()
        self.lam = lam

    def loss_terms(self, ctx):
        ids = ctx.inputs.get("input_ids")
        if ids is None:  # DPO batches hold prompt/chosen/rejected ids
            ids = ctx.inputs["prompt_input_ids"]
            mask = ctx.inputs["prompt_attention_mask"]
        else:
            mask = ctx.inputs["attention_mask"]
        emb = ctx.model.get_input_embeddings()(ids).pow(2).mean(-1)
        per_row = (emb * mask).sum(1) / mask.sum(1)
        return {"energy": self.lam * per_row.mean()}


COMMON = dict(
    max_steps=1,
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
    max_grad_norm=0.0,
    optim="sgd",
)


def _build(kind, out, batch, ga, regs):
    tok = build_char_tokenizer()
    kw = dict(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=ga, **COMMON)
    if kind == "hf":
        return llmreg.RegTrainer(
            model=tiny_llama(vocab_size=len(tok)),
            args=transformers.TrainingArguments(**kw),
            train_dataset=lm_dataset(tok),
            regularizers=regs,
            data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False),
        )
    if kind == "sft":
        return llmreg.RegSFTTrainer(
            model=tiny_llama(vocab_size=len(tok)),
            args=trl.SFTConfig(max_length=64, **kw),
            processing_class=tok,
            regularizers=regs,
            train_dataset=make_builtin_dataset(format="prompt_completion", num_examples=16),
        )
    return llmreg.RegDPOTrainer(
        model=tiny_llama(vocab_size=len(tok)),
        ref_model=tiny_llama(vocab_size=len(tok)),
        args=trl.DPOConfig(max_length=64, **kw),
        processing_class=tok,
        regularizers=regs,
        train_dataset=make_builtin_dataset(format="preference", num_examples=16),
    )


@pytest.mark.parametrize("kind", ["hf", "sft", "dpo"])
def test_term_scaling_matches_across_accumulation(kind, tmp_path):
    results = {}
    for lam in (0.0, 500.0):
        for batch, ga in ((8, 1), (2, 4)):
            trainer = _build(kind, tmp_path / f"{lam}-{batch}", batch, ga, [EmbeddingEnergy(lam)])
            trainer.train()
            results[(lam, batch)] = weights(trainer.model)
    # the term's own effect on the update (SGD: the difference to the lam=0 run of the same batching) ...
    effect = {b: {n: results[(500.0, b)][n] - results[(0.0, b)][n] for n in results[(0.0, b)]} for b in (8, 2)}
    assert max(v.norm().item() for v in effect[8].values()) > 1e-3
    # ... is the same with GA=4 x 2 as with GA=1 x 8 (a missing or double GA division would make it 4x or 1/4x)
    assert max_rel_diff(effect[8], effect[2]) < 1e-3
    # and the host's own loss agrees across accumulation up to float noise
    assert max_rel_diff(results[(0.0, 8)], results[(0.0, 2)]) < 1e-4


def test_term_metric_is_logged(tmp_path):
    trainer = _build("hf", tmp_path, 4, 1, [EmbeddingEnergy(1.0)])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("reg/regularizer/energy" in h and h["reg/regularizer/energy"] > 0 for h in logged)
