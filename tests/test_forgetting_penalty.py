"""forgetting_penalty: the edit is the gradient of the explicit penalty (full and LoRA), SI / EWC importance
equal their formulas computed by hand, bad artifacts fail at setup, and state resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import edited_and_autograd_grads, losses, make_hf_trainer, max_rel_diff, random_artifact, weights
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

import llmreg
from llmreg.core.shards import ShardAccess
from llmreg.data import tiny_llama
from llmreg.regularizers import ForgettingPenalty, SIImportance
from llmreg.regularizers.forgetting import artifact as art
from llmreg.regularizers.forgetting.record import write_ewc_artifact, write_si_artifact
from llmreg.regularizers.forgetting.targets import layer_of


class _NoDS:
    is_deepspeed_enabled = False


def _perturb(model, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def test_full_edit_equals_autograd_of_explicit_penalty(tok, tmp_path):
    model = tiny_llama(vocab_size=len(tok), seed=0)
    path = random_artifact(tmp_path / "imp", model, scale=1e6, layer_scale={"1": 3.0})
    # temperature so that softmax(c * ||Omega_l||) is far from uniform and from one-hot
    reg = ForgettingPenalty(artifact=path, lam=0.7, layer_temperature=3e-9)
    reg.setup(model, _NoDS())
    shards = ShardAccess.from_model(model)
    reg.on_prepared(model, shards)
    a = {k: float(v) for k, v in reg.coefficients.items()}
    assert set(a) == {"0", "1"} and 0.05 < min(a.values()) < 0.45 and sum(a.values()) == pytest.approx(1.0)
    start, omega = weights(model), art.load_importance(path, reg.importance.keys())
    # the layer coefficients are the softmax of c * ||Omega_l||_F, from the artifact
    norms = torch.tensor([sum(omega[n].pow(2).sum() for n in omega if layer_of(n) == l) ** 0.5 for l in "01"])
    assert torch.allclose(torch.tensor([a["0"], a["1"]]), torch.softmax(3e-9 * norms.double(), 0).float())

    _perturb(model)
    edited, reference, penalty = edited_and_autograd_grads(
        model,
        tok,
        reg,
        shards,
        lambda m: sum(
            0.7 * a[layer_of(n)] * (omega[n] * (p - start[n]).pow(2)).sum()
            for n, p in m.named_parameters()
            if n in omega
        ),
    )
    assert len(omega) == 14  # 7 linear weights in each of the 2 decoder layers; embeddings, norms, head untouched
    for n in reference:
        assert torch.allclose(edited[n], reference[n], atol=1e-5, rtol=1e-4), n
    assert reg.metrics()["penalty"] == pytest.approx(float(penalty.detach()), rel=1e-5)
    assert reg.metrics()["layer_coef/0"] == pytest.approx(a["0"])


@pytest.mark.parametrize("scale", ["rms", "mean"])
@pytest.mark.parametrize("importance", ["si", "ewc"])
def test_normalised_importance_scale_is_the_explicit_penalty_with_omega_over_its_divisor(
    tok, tmp_path, importance, scale
):
    """importance_scale rms / mean: the edit is the gradient of lam * sum_l a_l * sum (Omega / d) (theta -
    theta*)^2, d = sqrt(sum Omega^2 / count) (rms) or sum |Omega| / count (mean) over the covered weights and
    a_l = softmax(c * ||Omega_l / d||); the same edit for an artifact 1e6 times larger (the strength transfers
    across importance magnitudes)."""
    model = tiny_llama(vocab_size=len(tok), seed=0)
    small = random_artifact(tmp_path / "a", model, scale=1.0, layer_scale={"1": 3.0}, method=importance)
    large = random_artifact(tmp_path / "b", model, scale=1e6, layer_scale={"1": 3.0}, method=importance)
    regs = []
    for path in (small, large):
        reg = ForgettingPenalty(importance=importance, artifact=path, lam=0.7, importance_scale=scale,
                                layer_weighting="softmax", layer_temperature=0.008)  # fmt: skip
        reg.setup(model, _NoDS())
        shards = ShardAccess.from_model(model)
        reg.on_prepared(model, shards)
        regs.append((reg, shards))
    omega = art.load_importance(small, regs[0][0].importance.keys())
    count = sum(o.numel() for o in omega.values())
    if scale == "rms":
        divisor = (sum(o.pow(2).sum() for o in omega.values()) / count) ** 0.5
    else:
        divisor = sum(o.abs().sum() for o in omega.values()) / count
    scaled = {n: o / divisor for n, o in omega.items()}
    norms = torch.tensor([sum(scaled[n].pow(2).sum() for n in scaled if layer_of(n) == l) ** 0.5 for l in "01"])
    a = torch.softmax(0.008 * norms.double(), 0).float()
    assert 0.05 < float(a.min()) < 0.45  # neither flat nor one-hot at this temperature
    for reg, _ in regs:
        assert torch.allclose(torch.stack([reg.coefficients["0"], reg.coefficients["1"]]), a, rtol=1e-5)
    start = weights(model)
    _perturb(model)
    grads = []
    for reg, shards in regs:
        edited, reference, _ = edited_and_autograd_grads(
            model,
            tok,
            reg,
            shards,
            lambda m: sum(
                0.7 * a[int(layer_of(n))] * (scaled[n] * (p - start[n]).pow(2)).sum()
                for n, p in m.named_parameters()
                if n in scaled
            ),
        )
        for n in reference:
            assert torch.allclose(edited[n], reference[n], atol=1e-5, rtol=1e-4), n
        grads.append(edited)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n


def test_mean_importance_scale_refuses_an_artifact_without_its_sums(tok, tmp_path):
    """An artifact written before importance_scale=mean has no importance_sum_abs: a clear error at setup, not a
    divisor of 0 or a silent fallback; rms still works on it."""
    model = tiny_llama(vocab_size=len(tok), seed=0)
    path = random_artifact(tmp_path / "imp", model, scale=1e3)
    meta_file = next(p for p in (tmp_path / "imp").iterdir() if p.suffix == ".json")
    meta = json.loads(meta_file.read_text())
    del meta["importance_sum_abs"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(llmreg.ConfigError, match="importance_sum_abs"):
        ForgettingPenalty(artifact=path, importance_scale="mean").setup(model, _NoDS())
    ForgettingPenalty(artifact=path, importance_scale="rms").setup(model, _NoDS())


def test_checkpoint_of_another_importance_scale_is_refused(tok, tmp_path):
    model = tiny_llama(vocab_size=len(tok), seed=0)
    path = random_artifact(tmp_path / "imp", model, scale=1e3)
    regs = {}
    for scale in ("raw", "rms"):
        regs[scale] = ForgettingPenalty(artifact=path, importance_scale=scale)
        regs[scale].setup(model, _NoDS())
        regs[scale].on_prepared(model, ShardAccess.from_model(model))
    saved = regs["rms"].state_dict()
    assert saved["omega_divisor"] == pytest.approx(regs["rms"]._omega_divisor) and saved["omega_divisor"] > 1.0
    regs["rms"].load_state_dict(saved)  # same scale: restored
    with pytest.raises(ValueError, match="resume with the importance_scale"):
        regs["rms"].load_state_dict(regs["raw"].state_dict())
    with pytest.raises(ValueError, match="resume with the importance_scale"):
        regs["raw"].load_state_dict(saved)


def _lora_model(tok, seed=0):
    model = tiny_llama(vocab_size=len(tok), seed=seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(model, config)


@pytest.mark.parametrize("importance", ["si", "l2sp"])
def test_lora_edit_equals_autograd_of_dense_product_penalty(tok, tmp_path, importance):
    base = tiny_llama(vocab_size=len(tok), seed=0)
    opts = {"artifact": random_artifact(tmp_path / "imp", base)} if importance == "si" else {}
    model = _lora_model(tok)
    reg = ForgettingPenalty(importance=importance, lam=0.3, layer_weighting="uniform", **opts)
    reg.setup(model, _NoDS())
    shards = ShardAccess.from_model(model)
    reg.on_prepared(model, shards)
    _perturb(model)  # B moves off 0, so dW = s * B @ A is not zero
    modules = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(modules) == 4

    def explicit_penalty(_model):
        penalty = 0.0
        for name, m in modules.items():
            key = name.replace("base_model.model.", "") + ".weight"
            a0, b0 = reg.anchors[key + ":A"], reg.anchors[key + ":B"]
            s = m.scaling["default"]
            omega = reg.importance[key] if importance == "si" else 1.0
            dw = s * m.lora_B["default"].weight @ m.lora_A["default"].weight - s * b0 @ a0
            penalty = penalty + 0.3 * 0.5 * (omega * dw.pow(2)).sum()  # uniform a_l = 1/2 over 2 layers
        return penalty

    edited, reference, penalty = edited_and_autograd_grads(model, tok, reg, shards, explicit_penalty)
    for n in reference:
        assert torch.allclose(edited[n], reference[n], atol=1e-6, rtol=1e-4), n
    assert reg.metrics()["penalty"] == pytest.approx(float(penalty.detach()), rel=1e-5)
    # only dW's importance (dense, out x in) and A*, B* are stored; no base weight copies
    assert all(":" in k for k in reg.anchors)


def test_edit_training_equals_loss_term_training(tok, tmp_path):
    """Through the trainer, with GA=2 and clipping: the edit trains like the penalty added to the loss."""
    path = random_artifact(tmp_path / "imp", tiny_llama(vocab_size=len(tok), seed=0), scale=10.0)
    runs = {}
    for apply in ("grad_edit", "loss"):
        trainer = make_hf_trainer(
            tok,
            tmp_path / apply,
            gradient_accumulation_steps=2,
            max_grad_norm=0.5,
            regularizers=[
                {
                    "name": "forgetting_penalty",
                    "artifact": path,
                    "lam": 0.5,
                    "apply": apply,
                    "layer_weighting": "uniform",
                }
            ],
        )
        trainer.train()
        penalty = [h["reg/forgetting_penalty/penalty"] for h in trainer.state.log_history if "loss" in h]
        runs[apply] = (losses(trainer), weights(trainer.model), penalty)
    plain = make_hf_trainer(tok, tmp_path / "plain", gradient_accumulation_steps=2, max_grad_norm=0.5)
    plain.train()
    # the loss variant logs CE + R; the edit logs CE and reports R beside it
    assert runs["grad_edit"][2] == pytest.approx(runs["loss"][2], rel=1e-5)
    ce = [total - r for total, r in zip(runs["loss"][0], runs["loss"][2])]
    assert runs["grad_edit"][0] == pytest.approx(ce, rel=1e-5)
    assert max_rel_diff(runs["grad_edit"][1], runs["loss"][1]) < 1e-5
    assert max_rel_diff(runs["grad_edit"][1], weights(plain.model)) > 1e-3  # the penalty did something


class _Tape(TrainerCallback):
    """Independent record of SI's inputs: gradient before the step (no clipping set) and weights around it."""

    def __init__(self, names):
        self.names, self.grads, self.before, self.after = names, [], [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        params = dict(model.named_parameters())
        self.grads.append({n: params[n].grad.detach().clone() for n in self.names})
        self.before.append({n: params[n].detach().clone() for n in self.names})

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        params = dict(model.named_parameters())
        self.after.append({n: params[n].detach().clone() for n in self.names})


def test_si_importance_equals_hand_computed_path_integral(tok, tmp_path):
    recorder = SIImportance(xi=1e-3)
    trainer = make_hf_trainer(
        tok, tmp_path, regularizers=[recorder], max_steps=3, max_grad_norm=0.0, learning_rate=1e-2
    )
    start = weights(trainer.model)
    names = [n for n in start if n.startswith("model.layers.") and start[n].ndim == 2]
    tape = _Tape(names)
    trainer.add_callback(tape)
    trainer.train()
    assert len(tape.grads) == 3 and recorder.steps == 3
    write_si_artifact(trainer, recorder, str(tmp_path / "imp"), model="tiny", data="arithmetic")
    got = art.load_importance(str(tmp_path / "imp"), names)
    end = weights(trainer.model)
    for n in names:
        omega = -sum(g[n] * (a[n] - b[n]) for g, a, b in zip(tape.grads, tape.after, tape.before))
        expected = omega.clamp_min(0) / ((end[n] - start[n]) ** 2 + 1e-3)
        assert torch.allclose(got[n], expected, rtol=1e-4, atol=1e-6), n
        assert got[n].abs().sum() > 0
    meta = art.read_meta(str(tmp_path / "imp"))
    assert meta["method"] == "si" and meta["steps"] == 3 and sorted(meta["parameters"]) == sorted(names)
    assert meta["anchor_sum_sq"]["end"][names[0]] == pytest.approx(float(end[names[0]].double().pow(2).sum()))
    # the sums importance_scale rms / mean divide by, from the tensors the artifact holds
    for n in names:
        assert meta["importance_sum_sq"][n] == pytest.approx(float(got[n].double().pow(2).sum()), rel=1e-6)
        assert meta["importance_sum_abs"][n] == pytest.approx(float(got[n].double().abs().sum()), rel=1e-6)


def test_ewc_fisher_is_mean_of_per_example_squared_gradients(tok, tmp_path):
    trainer = make_hf_trainer(tok, tmp_path, train_sampling_strategy="sequential")
    model = trainer.model
    write_ewc_artifact(trainer, str(tmp_path / "imp"), num_samples=5)
    names = [n for n, p in model.named_parameters() if n.startswith("model.layers.") and p.ndim == 2]
    got = art.load_importance(str(tmp_path / "imp"), names)
    ds = trainer.train_dataset
    per_example = []
    for i in range(5):  # sequential order: the first five examples, one at a time
        batch = trainer.data_collator([{k: ds[i][k] for k in ("input_ids", "attention_mask")}])
        model.zero_grad()
        model(**batch).loss.backward()
        per_example.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if n in names})
    for n in names:
        expected = torch.stack([g[n] ** 2 for g in per_example]).mean(0)
        assert torch.allclose(got[n], expected, rtol=1e-5, atol=1e-10), n
    assert art.read_meta(str(tmp_path / "imp"))["examples"] == 5


# -- bad input ---------------------------------------------------------------------------------------


def _meta(path):
    return json.loads((path / art.META_FILE).read_text())


def _write_meta(path, meta):
    (path / art.META_FILE).write_text(json.dumps(meta))


def test_bad_artifacts_fail_at_setup_with_clear_errors(tok, tmp_path):
    model = tiny_llama(vocab_size=len(tok), seed=0)
    path = tmp_path / "imp"
    random_artifact(path, model)

    with pytest.raises(llmreg.ConfigError, match="needs `artifact`"):
        ForgettingPenalty()
    with pytest.raises(llmreg.ConfigError, match="artifact not found"):
        ForgettingPenalty(artifact=str(tmp_path / "nope"))
    with pytest.raises(llmreg.ConfigError, match="holds 'si' importance"):
        ForgettingPenalty(importance="ewc", artifact=str(path))
    with pytest.raises(llmreg.ConfigError, match="expected one of"):
        ForgettingPenalty(artifact=str(path), layer_weighting="softer")

    other = tiny_llama(vocab_size=len(tok), seed=0, hidden_size=32, intermediate_size=64)
    with pytest.raises(llmreg.ConfigError, match="recorded for another model .*hidden_size 64 vs 32"):
        ForgettingPenalty(artifact=str(path)).setup(other, _NoDS())

    with pytest.raises(llmreg.ConfigError, match="not the anchor .*phase1_end"):
        ForgettingPenalty(artifact=str(path)).setup(tiny_llama(vocab_size=len(tok), seed=1), _NoDS())

    meta = _meta(path)
    del meta["parameters"]["model.layers.1.mlp.down_proj.weight"]
    _write_meta(path, meta)
    with pytest.raises(llmreg.ConfigError, match="no importance for model.layers.1.mlp.down_proj.weight"):
        ForgettingPenalty(artifact=str(path)).setup(model, _NoDS())

    meta["parameters"]["model.layers.1.mlp.down_proj.weight"] = [3, 3]
    _write_meta(path, meta)
    with pytest.raises(llmreg.ConfigError, match=r"down_proj.weight has shape \[3, 3\], the model's is \[64, 128\]"):
        ForgettingPenalty(artifact=str(path)).setup(model, _NoDS())


def test_anchor_mismatch_suggests_the_other_anchor(tok, tmp_path):
    model = tiny_llama(vocab_size=len(tok), seed=0)
    path = tmp_path / "imp"
    random_artifact(path, model)
    meta = _meta(path)
    meta["anchor_sum_sq"]["end"] = {n: 2 * v for n, v in meta["anchor_sum_sq"]["end"].items()}
    _write_meta(path, meta)
    with pytest.raises(llmreg.ConfigError, match="matches the importance run's start weights: set anchor=pretrained"):
        ForgettingPenalty(artifact=str(path)).setup(model, _NoDS())
    ForgettingPenalty(artifact=str(path), anchor="pretrained").setup(model, _NoDS())


# -- resume ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["forgetting_penalty", "si_importance"])
def test_resume_restores_state_exactly(tok, tmp_path, name):
    path = random_artifact(tmp_path / "imp", tiny_llama(vocab_size=len(tok), seed=0), scale=10.0)
    spec = {"name": name, **({"artifact": path, "lam": 0.5} if name == "forgetting_penalty" else {})}
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3)
    full = make_hf_trainer(tok, tmp_path / "full", regularizers=[spec], **kw)
    full.train()

    first = make_hf_trainer(tok, tmp_path / "part", regularizers=[spec], **kw)
    first.train()  # writes checkpoint-3 (and 6); resume from 3
    resumed = make_hf_trainer(tok, tmp_path / "part", regularizers=[spec], **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))

    assert losses(resumed)[-3:] == pytest.approx(losses(full)[-3:], rel=1e-5)
    assert max_rel_diff(weights(full.model), weights(resumed.model)) < 1e-5
    a, b = full.reg_stack.regularizers[0].state_dict(), resumed.reg_stack.regularizers[0].state_dict()
    for key, value in a.items():
        if isinstance(value, dict):
            for k, v in value.items():
                if torch.is_tensor(v):
                    assert torch.allclose(v, b[key][k], rtol=1e-5, atol=1e-7), (key, k)
        else:
            assert value == b[key]
