"""kl_to_base: the chunked KL against an explicit formula, the trainer's gradient against autograd of the explicit
objective, lam = 0 == plain training, PEFT's disabled-adapter base, bad options, and two-process ZeRO-2/3 ==
one process."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_dataset, losses, make_hf_trainer, max_rel_diff, weights
from test_deepspeed import _run

import llmreg
from llmreg.data import tiny_llama
from llmreg.regularizers.kl_to_base import kl_positions, kl_sum


def _explicit_kl(logits_theta, logits_base, mask, reverse=False):
    """mean over masked positions of sum_v p (log p - log q), written out."""
    lq = F.log_softmax(logits_theta.double(), -1)
    lp = F.log_softmax(logits_base.double(), -1)
    if reverse:
        lp, lq = lq, lp
    per_position = (lp.exp() * (lp - lq)).sum(-1)
    return per_position[mask].sum() / mask.sum()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_kl_equals_the_explicit_sum(reverse, chunk):
    g = torch.Generator().manual_seed(0)
    head, base_head = torch.nn.Linear(8, 11, bias=False), torch.nn.Linear(8, 11, bias=False)
    h, hb = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    got = kl_sum(h, hb, head, base_head, reverse=reverse, chunk_size=chunk)
    want = _explicit_kl(head(h), base_head(hb), torch.ones(7, dtype=torch.bool), reverse) * 7
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # the same head and states: no divergence
    assert kl_sum(h, h, head, head, reverse=reverse, chunk_size=chunk).abs().item() < 1e-6


def test_positions_all_and_completion():
    inputs = {
        "input_ids": torch.zeros(1, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8, -100]]),
    }
    assert kl_positions(inputs, (1, 5), "all").tolist() == [[True, True, True, False, False]]
    assert kl_positions(inputs, (1, 5), "completion").tolist() == [[False, True, True, False, False]]


def _batch(tok, n=4):
    ds = lm_dataset(tok, n=n)
    ids = torch.tensor(ds["input_ids"])
    am = torch.tensor(ds["attention_mask"])
    labels = ids.masked_fill(am == 0, -100)
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def _perturb(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("path", ["host_logits", "hidden_states"])
@pytest.mark.parametrize("reverse", [False, True])
def test_trainer_gradient_is_autograd_of_the_explicit_objective(tok, tmp_path, reverse, path):
    lam = 0.7
    direction = "reverse" if reverse else "forward"
    trainer = make_hf_trainer(
        tok, tmp_path, [{"name": "kl_to_base", "lam": lam, "direction": direction, "chunk_size": 16}]
    )
    check_gradient_is_autograd_of_the_explicit_objective(trainer, tok, lam, path, reverse)


def check_gradient_is_autograd_of_the_explicit_objective(trainer, tok, lam: float, path: str, reverse: bool = False):
    """The trainer's loss and gradient == those of `CE + lam * KL` computed explicitly from the model's own logits
    and a deep copy of the model taken before the policy moved (shared with tests/test_output_head.py)."""
    if path == "hidden_states":  # as under TRL's fused head: no LM-head forward to reuse, logits from hidden states
        trainer.reg_stack.regularizers[0]._hook_handles[1].remove()
    base = copy.deepcopy(trainer.model)
    _perturb(trainer.model)  # the policy moved away from the base it copied
    batch = _batch(tok)
    model = trainer.model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    out = model(**batch)
    with torch.no_grad():
        base_logits = base(**batch).logits
    mask = kl_positions(batch, batch["input_ids"].shape, "all")
    explicit = out.loss + lam * _explicit_kl(out.logits, base_logits, mask, reverse).float()
    explicit.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert loss.item() == pytest.approx(explicit.item(), rel=1e-5)
    assert max_rel_diff(want, got) < 1e-4
    # the KL term is not zero here: the comparison is not trivially met by the plain loss
    assert explicit.item() - out.loss.item() > 1e-4


def test_zero_lambda_trains_exactly_like_plain(tok, tmp_path):
    plain = make_hf_trainer(tok, tmp_path / "plain")
    plain.train()
    reg = make_hf_trainer(tok, tmp_path / "kl", [{"name": "kl_to_base", "lam": 0.0}])
    reg.train()
    assert losses(reg) == losses(plain)
    assert all(torch.equal(a, b) for a, b in zip(weights(plain.model).values(), weights(reg.model).values()))
    strong = make_hf_trainer(tok, tmp_path / "strong", [{"name": "kl_to_base", "lam": 5.0}])
    strong.train()
    assert max_rel_diff(weights(plain.model), weights(strong.model)) > 1e-3  # the term does act


def test_peft_base_is_the_model_with_its_adapter_disabled(tok, tmp_path):
    from peft import LoraConfig, get_peft_model

    plain = tiny_llama(vocab_size=len(tok), seed=0)
    base = copy.deepcopy(plain)
    model = get_peft_model(
        plain,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    trainer = make_hf_trainer(tok, tmp_path, [{"name": "kl_to_base", "lam": 1.0}], model=model)
    reg = trainer.reg_stack.regularizers[0]
    assert reg._base is None  # no second copy of the weights
    batch = _batch(tok)
    model.train()
    total = trainer.compute_loss(model, batch)
    out = model(**batch)
    with torch.no_grad():
        base_logits = base(**batch).logits
    mask = kl_positions(batch, batch["input_ids"].shape, "all")
    kl = _explicit_kl(out.logits, base_logits, mask).item()
    assert kl > 1e-4
    assert total.item() - out.loss.item() == pytest.approx(kl, rel=1e-4)


def test_bad_options_are_clear_errors():
    with pytest.raises(llmreg.ConfigError, match="direction"):
        llmreg.build_regularizer({"name": "kl_to_base", "direction": "sideways"})
    with pytest.raises(llmreg.ConfigError, match="lamb"):
        llmreg.build_regularizer({"name": "kl_to_base", "lamb": 1.0})
    with pytest.raises((ValueError, llmreg.ConfigError), match="lam must be >= 0"):
        llmreg.build_regularizer({"name": "kl_to_base", "lam": -1.0})


def test_dpo_and_grpo_are_refused():
    with pytest.raises(llmreg.ConfigError, match="does not support trainer kind 'dpo'"):
        llmreg.RegularizerStack([{"name": "kl_to_base"}], trainer_kind="dpo")


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_zero_matches_single_process(zero, tmp_path):
    stack = [{"name": "kl_to_base", "lam": 1.0}]
    single = _run(tmp_path / "single", 0, stack)
    dist = _run(tmp_path / "dist", zero, stack)
    assert dist["world"] == 2
    assert dist["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert max_rel_diff(single["weights"], dist["weights"]) < 1e-5
    kl = [m["reg/kl_to_base/kl"] for m in dist["metrics"]]
    # the policy starts at the base, then moves (the logged value is rank 0's micro-batch, so it is not compared
    # with the single process's; the weights above are)
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 1e-4
