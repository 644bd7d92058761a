"""Pins the TRL GRPOTrainer internals that llmreg/integrations/trl.py relies on (written against trl 1.16)."""

from __future__ import annotations

import inspect

import pytest
import torch
import trl

import llmreg
from llmreg.data import build_char_tokenizer, make_builtin_dataset, tiny_llama
from llmreg.integrations import trl as trl_compat


def test_signatures_and_helpers_exist():
    params = list(inspect.signature(trl.GRPOTrainer._get_per_token_logps_and_entropies).parameters)
    assert params[:5] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep"]
    assert "batch_size" in params and "compute_entropy" in params
    assert list(inspect.signature(trl.GRPOTrainer._generate_and_score_completions).parameters) == ["self", "inputs"]
    from trl.trainer.utils import add_fused_lm_head, maybe_gather_lm_head_ctx, shuffle_sequence_dict, split_tensor_dict

    assert callable(add_fused_lm_head) and callable(maybe_gather_lm_head_ctx)
    # extra tensor keys travel with the batch through TRL's shuffle and split
    batch = {"a": torch.arange(4), "lp_reg_x": torch.arange(4) * 10, "n": torch.tensor(3)}
    parts = split_tensor_dict(shuffle_sequence_dict(batch), 2)
    assert all(torch.equal(p["lp_reg_x"], p["a"] * 10) and p["n"] == 3 for p in parts)


def test_config_fields_of_the_recipe():
    cfg = trl.GRPOConfig(output_dir="/tmp/llmreg_compat", use_cpu=True, epsilon=1.0, epsilon_high=9.0, beta=0.0)
    assert cfg.loss_type == "dapo" and cfg.scale_rewards == "group" and cfg.entropy_coef == 0.0
    assert (cfg.epsilon, cfg.epsilon_high, cfg.beta) == (1.0, 9.0, 0.0)
    assert hasattr(cfg, "steps_per_generation") and hasattr(cfg, "num_iterations")


def _trainer(tmp_path, **kw):
    tok = build_char_tokenizer()
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=5,
        beta=0.0,
        use_cpu=True,
        bf16=False,
        report_to=[],
        **kw,
    )
    return llmreg.RegGRPOTrainer(
        model=tiny_llama(vocab_size=len(tok)),
        args=args,
        processing_class=tok,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        train_dataset=make_builtin_dataset(format="prompt_only", num_examples=8),
    )


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo"])
@pytest.mark.parametrize("ga", [1, 2])
def test_aggregate_like_loss_matches_trl(loss_type, ga, tmp_path):
    """TRL adds beta * per_token_kl to its per-token loss before aggregating: the change of TRL's loss when beta
    goes from 0 to b must equal b * aggregate_like_loss(per_token_kl) / GA."""
    trainer = _trainer(tmp_path, loss_type=loss_type, gradient_accumulation_steps=ga, steps_per_generation=2)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = ga
    g = torch.Generator().manual_seed(0)
    vocab = trainer.model.config.vocab_size
    completion_mask = torch.ones(4, 5, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[3, 1:] = 0
    inputs = {
        "prompt_ids": torch.randint(3, vocab, (4, 3), generator=g),
        "prompt_mask": torch.ones(4, 3, dtype=torch.long),
        "completion_ids": torch.randint(3, vocab, (4, 5), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
        "num_items_in_batch": torch.tensor(37.0),
        "ref_per_token_logps": -torch.rand(4, 5, generator=g) * 5,
    }
    with torch.no_grad():
        base = trainer._compute_loss(trainer.model, inputs)
        trainer.beta = 0.3
        with_kl = trainer._compute_loss(trainer.model, inputs)
        trainer.beta = 0.0
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], completion_mask], 1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, 5)
    ref = inputs["ref_per_token_logps"]
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    ours = 0.3 * trl_compat.aggregate_like_loss(trainer, kl, trl_compat.response_mask(inputs), inputs) / ga
    assert torch.allclose(with_kl - base, ours, atol=1e-6), (with_kl - base, ours)


def test_old_logps_condition(tmp_path):
    assert not trl_compat.old_logps_computed_by_trl(_trainer(tmp_path / "a"))
    assert trl_compat.old_logps_computed_by_trl(_trainer(tmp_path / "b", steps_per_generation=2))
    assert trl_compat.old_logps_computed_by_trl(_trainer(tmp_path / "c", num_iterations=2))


def test_softcapped_and_scaled_heads_are_accepted(tmp_path):
    """The logit transform is applied after the head (core.output_head, tests/test_output_head.py)."""
    trainer = _trainer(tmp_path)
    trainer.model.config.final_logit_softcapping = 30.0
    assert trl_compat.check_plain_lm_head(trainer.model) is None
    trainer.model.config.final_logit_softcapping = None


def test_lp_reg_refuses_an_unknown_loss_type(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.loss_type = "something_new"
    assert "something_new" in trl_compat.unsupported_loss_type(trainer)
    reg = llmreg.build_regularizer({"name": "lp_reg"})
    with pytest.raises(llmreg.ConfigError, match="loss_type 'something_new'"):
        reg.setup(trainer.model, trainer)
