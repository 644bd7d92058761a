"""LfU (arXiv 2511.13052): the ascent step, the consistency value and its gradient against explicit formulas
written here with other mechanisms (retain_grad, weight copies), the no-op settings, checkpointing, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import losses, make_hf_trainer, max_rel_diff, sft_args, weights
from peft import LoraConfig, get_peft_model

import llmreg
from llmreg.core import ConfigError, LossContext
from llmreg.data import build_char_tokenizer, make_builtin_dataset, tiny_llama
from llmreg.regularizers.lfu import consistency


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _batch(tok):
    enc = tok(["What is 1 + 2? Answer: 3", "7 - 5 = 2", "copy abc -> abc"], return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    labels[:, :4] = -100  # a prompt part: only the rest is "response"
    return {**enc, "labels": labels}


def _model(tok, peft=False):
    model = tiny_llama(vocab_size=len(tok), seed=0)
    if peft:
        model = get_peft_model(
            model,
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"),
        )
        # a trained-looking adapter: B = 0 would make dL/dA vanish
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    model.train()
    return model


def _run_reg(model, batch, **options):
    """One micro-step of the regularizer outside a trainer: the host forward, then loss_terms."""
    reg = llmreg.build_regularizer({"name": "lfu", **options})
    reg.setup(model, trainer=None)
    out = model(**batch)
    ctx = LossContext(model=model, inputs=batch, loss=out.loss, outputs=out, trainer=None)
    term = reg.loss_terms(ctx)["consistency"]
    return reg, out.loss, term


def _layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)


def _hidden_with(model, batch, add=None):
    """Decoder-layer outputs, with `add[l]` added to layer l's output by a hook written here."""
    outs, handles = [], []
    for i, layer in enumerate(_layers(model)):

        def hook(mod, args, output, i=i):
            h = output[0] if isinstance(output, tuple) else output
            if add is not None:
                h = h + add[i]
            outs.append(h)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handles.append(layer.register_forward_hook(hook))
    try:
        out = model(**batch)
    finally:
        for h in handles:
            h.remove()
    return out, outs


def _explicit_mse(targets, perturbed, mask):
    vals = [((p[mask] - t[mask].detach()) ** 2).mean() for t, p in zip(targets, perturbed)]
    return sum(vals) / len(vals)


def test_reps_delta_is_normalised_ascent_gradient_and_consistency_is_explicit_mse(tok):
    batch = _batch(tok)
    alpha = 0.3
    model = _model(tok)
    # independent g: retain_grad on every layer output, a real backward, g_l summed over batch and positions
    ref = copy.deepcopy(model)
    out, hs = _hidden_with(ref, batch)
    for h in hs:
        h.retain_grad()
    out.loss.backward()
    g = [h.grad.sum((0, 1)) for h in hs]
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    expected = [alpha * x / norm for x in g]

    reg, _, term = _run_reg(model, batch, alpha=alpha, lam=2.0)
    got = [reg._state.delta[("reps", i)] for i in range(len(g))]
    for e, d in zip(expected, got):
        torch.testing.assert_close(d, e, rtol=1e-5, atol=1e-8)
    assert norm > 0 and float(sum(d.norm() ** 2 for d in got).sqrt()) == pytest.approx(alpha, rel=1e-5)

    # consistency: explicit MSE between the clean outputs and the outputs with delta added, response tokens only
    with torch.no_grad():
        _, clean = _hidden_with(ref, batch)
        _, pert = _hidden_with(ref, batch, add=expected)
    mask = batch["labels"] != -100
    assert mask.sum() < batch["attention_mask"].sum()  # the mask really drops positions
    want = _explicit_mse(clean, pert, mask)
    assert float(term.detach()) == pytest.approx(2.0 * float(want), rel=1e-4)
    assert float(want) > 1e-6


def test_gradient_equals_explicit_objective_and_clean_branch_gets_no_consistency_gradient(tok):
    batch = _batch(tok)
    alpha, lam = 0.5, 3.0
    model = _model(tok)
    ref = copy.deepcopy(model)
    reg, loss, term = _run_reg(model, batch, alpha=alpha, lam=lam)
    deltas = [reg._state.delta[("reps", i)].detach() for i in range(len(_layers(model)))]
    (loss + term).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    mask = batch["labels"] != -100

    def explicit(detach_targets):
        ref.zero_grad()
        out, clean = _hidden_with(ref, batch)
        _, pert = _hidden_with(ref, batch, add=deltas)
        targets = [c.detach() for c in clean] if detach_targets else clean
        vals = [((p[mask] - t[mask]) ** 2).mean() for t, p in zip(targets, pert)]
        (out.loss + lam * sum(vals) / len(vals)).backward()
        return {n: p.grad.clone() for n, p in ref.named_parameters()}

    want = explicit(True)
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7, msg=n)
    # the same objective with gradient through the clean targets ends elsewhere: the stop-gradient matters
    leaky = explicit(False)
    assert max((leaky[n] - want[n]).abs().max().item() for n in want) > 1e-5

    # and directly: the consistency term has no gradient path to the clean hidden states
    model.zero_grad()
    reg2 = llmreg.build_regularizer({"name": "lfu", "alpha": alpha, "lam": lam})
    reg2.setup(model, None)
    out = model(**batch)
    clean_h = [reg2._state.host_hidden[i] for i in range(len(deltas))]
    term2 = reg2.loss_terms(LossContext(model=model, inputs=batch, loss=out.loss, outputs=out, trainer=None))
    grads = torch.autograd.grad(term2["consistency"], clean_h, allow_unused=True)
    assert all(gr is None or gr.abs().max() == 0 for gr in grads)


def test_full_ft_aux_lora_perturbation_equals_weight_perturbation(tok):
    """aux lora: delta B = alpha g_B/||g||, and the perturbed forward equals the model with W + s dB A."""
    batch = _batch(tok)
    alpha, rank, lora_alpha = 0.2, 4, 8.0
    model = _model(tok)
    ref = copy.deepcopy(model)
    reg, _, term = _run_reg(
        model, batch, alpha=alpha, aux="lora", aux_lora_rank=rank, aux_lora_alpha=lora_alpha, lam=1.0
    )
    scale = lora_alpha / rank
    # independent g_B: for y = W x + s B A x at B = 0, dL/dB = s * sum_tokens dL/dy (A x)^T; via retain_grad on
    # each linear's output
    outs, handles = {}, []
    for li, layer in enumerate(_layers(ref)):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):

                def hook(m, args, output, key=f"{li}.{name}"):
                    output.retain_grad()
                    outs[key] = (args[0].detach(), output)

                handles.append(mod.register_forward_hook(hook))
    ref(**batch).loss.backward()
    for h in handles:
        h.remove()
    keys = sorted(outs)
    assert len(keys) == 7 * len(_layers(ref))
    gb = {k: scale * torch.einsum("bto,btr->or", outs[k][1].grad, outs[k][0] @ reg._aux_a[("lora", k)].T) for k in keys}
    norm = torch.sqrt(sum((v**2).sum() for v in gb.values()))
    for k in keys:
        torch.testing.assert_close(reg._state.delta[("lora", k)], alpha * gb[k] / norm, rtol=1e-4, atol=1e-9)

    # the perturbed forward = a weight copy with W + s dB A (no hook)
    moved = copy.deepcopy(ref)
    with torch.no_grad():
        for li, layer in enumerate(_layers(moved)):
            for name, mod in layer.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    k = f"{li}.{name}"
                    mod.weight += scale * reg._state.delta[("lora", k)] @ reg._aux_a[("lora", k)]
        _, pert = _hidden_with(moved, batch)
        _, clean = _hidden_with(ref, batch)
    want = _explicit_mse(clean, pert, batch["labels"] != -100)
    assert float(term) == pytest.approx(float(want), rel=1e-3) and float(want) > 0


def test_aux_lora_ascent_under_bf16_autocast_follows_the_fp32_direction(tok):
    """The clean pass's zero-B shortcut (no GEMM in the forward, dL/dB in the backward) under CPU bf16 autocast:
    g and the layer inputs differ in dtype there; the step must still point where the fp32 step points."""
    batch = _batch(tok)
    reg32, _, _ = _run_reg(_model(tok), batch, aux="lora")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reg16, _, term = _run_reg(_model(tok), batch, aux="lora")
    assert torch.isfinite(term)
    a = torch.cat([reg32._state.delta[k].flatten().float() for k in sorted(reg32._state.delta, key=str)])
    b = torch.cat([reg16._state.delta[k].flatten().float() for k in sorted(reg32._state.delta, key=str)])
    assert F.cosine_similarity(a, b, dim=0) > 0.95 and b.norm() == pytest.approx(0.1, rel=0.02)


def test_peft_adapter_perturbation_equals_moved_adapter(tok):
    """PEFT: delta = alpha (dL/dA, dL/dB)/||.|| of the adapter itself, and the perturbed forward equals the
    model with A + dA, B + dB."""
    batch = _batch(tok)
    alpha = 0.1
    model = _model(tok, peft=True)
    ref = copy.deepcopy(model)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    params = [p for n, p in ref.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(ref(**batch).loss, params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    reg, _, term = _run_reg(model, batch, alpha=alpha, aux="lora", lam=1.0)
    by_key = {}
    for (which, key), d in reg._state.delta.items():
        by_key[(which, key)] = d
    moved = copy.deepcopy(ref)
    moved_params = dict(moved.named_parameters())
    matched = 0
    with torch.no_grad():
        for n, g in zip(names, grads):
            # ...layers.<i>.self_attn.q_proj.lora_A.default.weight -> ("A", "<i>.self_attn.q_proj.default")
            head, tail = n.split(".layers.", 1)
            idx, rest = tail.split(".", 1)
            mod_path, which, adapter, _ = rest.rsplit(".", 3)
            d = by_key[(which[-1], f"{idx}.{mod_path}.{adapter}")]
            torch.testing.assert_close(d, alpha * g / norm, rtol=1e-4, atol=1e-9)
            moved_params[n] += d
            matched += 1
        assert matched == len(by_key) == len(names)
        _, pert = _hidden_with(moved, batch)
        _, clean = _hidden_with(ref, batch)
    want = _explicit_mse(clean, pert, batch["labels"] != -100)
    assert float(term) == pytest.approx(float(want), rel=1e-3) and float(want) > 0


def test_sum_over_hidden_is_d_times_mean_and_embeddings_add_a_zero_layer(tok):
    batch = _batch(tok)
    d = tiny_llama(vocab_size=len(tok)).config.hidden_size
    _, _, mean = _run_reg(_model(tok), batch, lam=1.0, alpha=0.5)
    _, _, summed = _run_reg(_model(tok), batch, lam=1.0, alpha=0.5, distance="sq_l2_sum")
    assert float(summed) == pytest.approx(d * float(mean), rel=1e-5)
    # the embedding output is the same in both branches (reps perturb layer outputs): one more zero in the mean
    n = len(_layers(_model(tok)))
    _, _, with_emb = _run_reg(_model(tok), batch, lam=1.0, alpha=0.5, include_embeddings=True)
    assert float(with_emb) == pytest.approx(float(mean) * n / (n + 1), rel=1e-5)
    # a layer subset: the mean over just those layers
    reg, _, last = _run_reg(_model(tok), batch, lam=1.0, alpha=0.5, layers=[-1])
    assert reg._selected == [n - 1] and float(last) != pytest.approx(float(mean), rel=1e-3)


def test_consistency_pure_function_against_hand_numbers():
    t = [torch.zeros(1, 2, 2)]
    p = [torch.tensor([[[1.0, 3.0], [5.0, 7.0]]])]
    mask = torch.tensor([[True, False]])
    assert float(consistency(t, p, mask)) == pytest.approx((1 + 9) / 2)
    assert float(consistency(t, p, mask, distance="sq_l2_sum")) == pytest.approx(10.0)
    assert float(consistency(t, p, None)) == pytest.approx((1 + 9 + 25 + 49) / 4)
    assert float(consistency(t, p, mask, count=2)) == pytest.approx(10 / 4)


@pytest.mark.parametrize(
    "setting",
    [{"alpha": 0.0}, {"lam": 0.0}, {"alpha": 0.0, "aux": "lora"}, {"lam": 0.0, "aux": "lora"}],
    ids=["alpha0", "lam0", "alpha0-lora", "lam0-lora"],
)
def test_zero_alpha_or_lambda_trains_exactly_like_plain_sft(tok, tmp_path, setting):
    plain = make_hf_trainer(tok, tmp_path / "plain", max_steps=3)
    plain.train()
    lfu = make_hf_trainer(tok, tmp_path / "lfu", regularizers=[{"name": "lfu", **setting}], max_steps=3)
    lfu.train()
    assert losses(lfu) == losses(plain)
    a, b = weights(plain.model), weights(lfu.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # while the default setting does change the weights
    moved = make_hf_trainer(tok, tmp_path / "moved", regularizers=[{"name": "lfu", "alpha": 0.5}], max_steps=3)
    moved.train()
    assert any(not torch.equal(a[k], v) for k, v in weights(moved.model).items())


@pytest.mark.slow
@pytest.mark.parametrize("aux", ["reps", "lora"])
def test_gradient_checkpointing_gives_the_same_training(tok, tmp_path, aux):
    regs = [{"name": "lfu", "aux": aux, "alpha": 1.0}]
    plain = make_hf_trainer(tok, tmp_path / "a", regularizers=regs, max_steps=2)
    plain.train()
    ckpt = make_hf_trainer(tok, tmp_path / "b", regularizers=regs, max_steps=2, gradient_checkpointing=True)
    ckpt.train()
    assert all(layer.gradient_checkpointing for layer in ckpt.model.model.layers)
    assert ckpt.reg_stack.regularizers[0]._resolve_plan() == ("retain" if aux == "reps" else "stacked")
    a, b = weights(plain.model), weights(ckpt.model)
    assert max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a) < 1e-5
    if aux == "lora":  # the recompute inside the layers would lose delta: refused, not silently approximate
        wrong = make_hf_trainer(
            tok, tmp_path / "c", regularizers=[{**regs[0], "exec": "retain"}], max_steps=2, gradient_checkpointing=True
        )
        with pytest.raises(ConfigError, match="exec 'retain' with activation checkpointing"):
            wrong.train()


def test_sft_trainer_fused_head_and_fresh_ascent_batch(tok, tmp_path):

    def run(**opts):
        args = sft_args(tmp_path / str(len(opts)))
        t = llmreg.RegSFTTrainer(
            model=tiny_llama(vocab_size=len(tok)),
            args=args,
            processing_class=tok,
            regularizers=[{"name": "lfu", "alpha": 0.5, **opts}],
            train_dataset=make_builtin_dataset(format="prompt_completion", num_examples=32),
        )
        t.train()
        return [h for h in t.state.log_history if "reg/lfu/l_cons" in h]

    same, fresh = run(), run(ascent_batch="fresh")
    assert len(same) == len(fresh) == 2
    assert all(h["reg/lfu/l_cons"] > 0 for h in same + fresh)
    # the fresh batch gives another ascent direction, so another consistency value
    assert fresh[0]["reg/lfu/ascent_grad_norm"] != pytest.approx(same[0]["reg/lfu/ascent_grad_norm"], rel=1e-6)


def test_fresh_ascent_batches_resume_exactly(tok, tmp_path):
    """The fresh batch stream is checkpointed (its count): a run cut at step 3 and resumed on a fresh process
    state equals the uninterrupted one; a stream restarted from its seed would not."""
    from test_resume import KW, StopAt

    regs = [{"name": "lfu", "ascent_batch": "fresh", "alpha": 0.5, "lam": 5.0}]
    kw = dict(KW, per_device_train_batch_size=3)  # 16 rows: the stream wraps into a second epoch
    full = make_hf_trainer(tok, tmp_path / "full", regularizers=regs, **kw)
    full.train()
    first = make_hf_trainer(tok, tmp_path / "cut", regularizers=regs, **kw)
    first.add_callback(StopAt(3))
    first.train()
    assert first.reg_stack.regularizers[0].state_dict() == {"fresh_batches_drawn": 3}

    def resume(out):
        trainer = make_hf_trainer(tok, out, regularizers=regs, model=tiny_llama(vocab_size=len(tok), seed=7), **kw)
        trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
        return trainer

    resumed = resume(tmp_path / "cut")
    assert losses(full)[3:] == pytest.approx(losses(resumed)[-3:], rel=1e-5, abs=1e-6)
    assert max_rel_diff(weights(full.model), weights(resumed.model)) < 1e-5
    # the count is what makes it exact: a resume whose stream restarts from 0 lands elsewhere
    import llmreg.regularizers.lfu as lfu_module

    original = lfu_module.LfU.load_state_dict
    lfu_module.LfU.load_state_dict = lambda self, state: original(self, {})
    try:
        restarted = resume(tmp_path / "cut")
    finally:
        lfu_module.LfU.load_state_dict = original
    assert max_rel_diff(weights(full.model), weights(restarted.model)) > 1e-4


def test_clear_errors(tok):
    for kind in ("dpo", "grpo"):
        with pytest.raises(ConfigError, match="does not support trainer kind"):
            llmreg.RegularizerStack(["lfu"], trainer_kind=kind)
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        llmreg.build_regularizer({"name": "lfu", "alpah": 0.1})
    with pytest.raises(ConfigError, match="must be >= 0"):
        llmreg.build_regularizer({"name": "lfu", "lam": -1})
    reg = llmreg.build_regularizer({"name": "lfu", "layers": [1, 9]})
    with pytest.raises(ConfigError, match=r"layers \[9\] match no decoder layer"):
        reg.setup(_model(tok), None)
    reg = llmreg.build_regularizer({"name": "lfu", "aux": "lora", "aux_lora_targets": ["nothing_like_this"]})
    with pytest.raises(ConfigError, match="match no linear layer"):
        reg.setup(_model(tok), None)


def test_recipe_is_the_testbed_recipe_plus_lfu():
    import yaml
    from conftest import REPO

    from llmreg.recipe import load_recipe

    lfu = yaml.safe_load(open(f"{REPO}/recipes/lfu/testbed.yaml"))
    vanilla = yaml.safe_load(open(f"{REPO}/recipes/testbed/vanilla.yaml"))
    assert {k: v for k, v in lfu.items() if k not in ("regularizers", "output_dir")} == {
        k: v for k, v in vanilla.items() if k not in ("regularizers", "output_dir")
    }
    recipe = load_recipe(f"{REPO}/recipes/lfu/testbed.yaml")
    assert recipe.regularizers == [{"name": "lfu", "lam": 5.0, "alpha": 0.1, "aux": "reps"}]
    with pytest.raises(ConfigError, match="aux"):
        load_recipe(f"{REPO}/recipes/lfu/testbed.yaml", ["regularizers.0.aux=lorra"])


def test_step_overhead_runs_lfu_and_the_lora_variant(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "overhead.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    proc = subprocess.run(
        [
            sys.executable,
            f"{REPO}/benchmarks/step_overhead.py",
            "--size",
            "tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--only",
            "lfu",
            "lfu_lora",
            "--json",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_name = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(by_name) == {"vanilla", "lfu", "lfu_lora"}
    assert all(r["step_time_ratio"] > 0 for r in by_name.values())
    # the LoRA variant holds its fixed A factors: more tensor state than vanilla; RepS holds only vectors
    assert by_name["lfu_lora"]["peak_mem_ratio"] > by_name["lfu"]["peak_mem_ratio"] >= 1.0
