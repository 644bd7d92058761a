"""Learnable multipliers (arXiv 2601.04890): identity at init, the gradient identities, groups, the clip
that skips the multipliers, resume, export to plain weights (tied embeddings too), clear errors."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from conftest import REPO, losses, make_hf_trainer, max_rel_diff, weights
from test_recipe import nothing_loads  # noqa: F401  (a fixture)
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, TrainerCallback

import llmreg
from llmreg.core import ConfigError
from llmreg.data import tiny_llama
from llmreg.regularizers.multipliers import (
    LayerPlan,
    attach,
    explicit_linear,
    is_multiplier,
    multiplied_embedding,
    multiplied_linear,
    plan_for_model,
)
from llmreg.regularizers.multipliers.export import export_plain

IMPLS = [multiplied_linear, explicit_linear]


def _wrapped(model, **options):
    reg = llmreg.build_regularizer({"name": "multipliers", **options})
    reg.setup(model, trainer=None)
    return reg


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


# -- identity at initialisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"impl": "explicit"},
        {"placement": "symmetry_aware"},
        {"placement": "scalar"},
        {"tied_embeddings": "untie"},
        {"lm_head": True},
    ],
)
def test_wrapped_model_equals_plain_model_at_init(options, tie):
    plain = tiny_llama(vocab_size=60, seed=0, tie_word_embeddings=tie)
    wrapped = tiny_llama(vocab_size=60, seed=0, tie_word_embeddings=tie)
    reg = _wrapped(wrapped, **options)
    assert reg.names and all(is_multiplier(n) for n in reg.names)
    ids = _ids(60)
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - wrapped(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-6
    # the original parameters keep their names (checkpoints, weight-decay patterns, importances still apply)
    assert set(dict(plain.named_parameters())) <= set(dict(wrapped.named_parameters()))


def test_placements_put_the_papers_multipliers_where_the_spec_says():
    def kinds(options, tie=False):
        plan, _ = plan_for_model(tiny_llama(vocab_size=60, tie_word_embeddings=tie), **options)
        return {n.replace("model.layers.0.", ""): p for n, p in plan.items() if ".layers.1." not in n}

    rc = LayerPlan(row=True, col=True)
    all_ = kinds({"placement": "all"})
    assert all_ == {
        **{f"self_attn.{m}": rc for m in ("q_proj", "k_proj", "v_proj", "o_proj")},
        **{f"mlp.{m}": rc for m in ("gate_proj", "up_proj", "down_proj")},
        "model.embed_tokens": rc,
    }
    sym = kinds({"placement": "symmetry_aware"})
    assert sym == {
        "self_attn.q_proj": LayerPlan(row=True),
        "self_attn.o_proj": rc,
        "mlp.gate_proj": LayerPlan(row=True),
        "mlp.down_proj": rc,
        "model.embed_tokens": rc,
    }
    assert set(kinds({"placement": "scalar"}).values()) == {LayerPlan(scalar=True)}
    assert kinds({"placement": "none"}) == {}
    assert "model.embed_tokens" not in kinds({"placement": "all"}, tie=True)  # tied: skipped by default
    assert kinds({"placement": "all", "tied_embeddings": "untie"}, tie=True)["model.embed_tokens"] == rc
    assert kinds({"placement": "all", "lm_head": True})["lm_head"] == LayerPlan(row=True)


# -- gradients against the closed forms -------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS, ids=["fused", "explicit"])
def test_linear_gradients_equal_the_closed_forms(impl):
    torch.manual_seed(0)
    d_in, d_out = 5, 4
    x = torch.randn(3, 2, d_in, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_out, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=True)
    r = (1 + 0.3 * torch.randn(d_out, dtype=torch.float64)).requires_grad_()
    c = (1 + 0.3 * torch.randn(d_in, dtype=torch.float64)).requires_grad_()
    s = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    R = torch.randn(3, 2, d_out, dtype=torch.float64)
    y = impl(x, W, s * r, c, b)
    (y * R).sum().backward()
    # explicit formulas: W_eff = s diag(r) W diag(c); G = dL/dW_eff = sum_tokens R^T x
    X, Rm = x.detach().reshape(-1, d_in), R.reshape(-1, d_out)
    G = Rm.T @ X
    Wd, rd, cd, sd = W.detach(), r.detach(), c.detach(), s.detach()
    W_eff = sd * rd[:, None] * Wd * cd[None, :]
    assert torch.allclose(y, X.mm(W_eff.T).reshape(3, 2, d_out) + b.detach())
    expect = {
        "W": sd * rd[:, None] * cd[None, :] * G,  # r_i c_j G_ij (times s)
        "r": sd * (Wd * cd[None, :] * G).sum(1),  # sum_j W_ij c_j G_ij
        "c": sd * (rd[:, None] * Wd * G).sum(0),  # sum_i r_i W_ij G_ij
        "s": (rd[:, None] * Wd * cd[None, :] * G).sum().reshape(1),  # sum_ij W_ij G_ij with r, c in W
        "x": (Rm @ W_eff).reshape(3, 2, d_in),
        "b": Rm.sum(0),
    }
    got = {"W": W.grad, "r": r.grad, "c": c.grad, "s": s.grad, "x": x.grad, "b": b.grad}
    for key in expect:
        assert torch.allclose(got[key], expect[key], rtol=1e-10, atol=1e-12), key


def test_linear_without_columns_or_rows_and_under_bf16_autocast():
    torch.manual_seed(1)
    x, W = torch.randn(6, 8), torch.randn(5, 8)
    r, c = torch.rand(5) + 0.5, torch.rand(8) + 0.5
    for row, col in ((r, None), (None, c)):
        assert torch.allclose(multiplied_linear(x, W, row, col), explicit_linear(x, W, row, col), atol=1e-6)
    leaves = [t.clone().requires_grad_() for t in (x, W, r, c)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = multiplied_linear(*leaves)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, W, r, c)]
    explicit_linear(*ref).square().sum().backward()
    for a, b in zip(leaves, ref):
        assert a.grad.dtype == torch.float32
        assert (a.grad - b.grad).norm() / b.grad.norm() < 3e-2  # bf16 GEMM


def test_embedding_gradients_equal_the_closed_forms():
    torch.manual_seed(2)
    V, d = 7, 4
    E = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    r = (1 + 0.3 * torch.randn(V, dtype=torch.float64)).requires_grad_()
    c = (1 + 0.3 * torch.randn(d, dtype=torch.float64)).requires_grad_()
    ids = torch.tensor([[1, 3, 3, 6], [0, 1, 5, 3]])
    R = torch.randn(2, 4, d, dtype=torch.float64)
    out = multiplied_embedding(ids, E, r, c)
    (out * R).sum().backward()
    Ed, rd, cd = E.detach(), r.detach(), c.detach()
    exp_r, exp_c, exp_E = torch.zeros(V, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), torch.zeros_like(Ed)
    for b in range(2):
        for t in range(4):
            v, g = ids[b, t].item(), R[b, t]
            assert torch.allclose(out[b, t], rd[v] * Ed[v] * cd)
            exp_r[v] += (Ed[v] * cd * g).sum()
            exp_c += rd[v] * Ed[v] * g
            exp_E[v] += rd[v] * cd * g
    assert torch.allclose(r.grad, exp_r) and torch.allclose(c.grad, exp_c) and torch.allclose(E.grad, exp_E)


# -- groups, clipping, state -------------------------------------------------------------------------------


def test_multipliers_get_their_own_weight_decay_and_learning_rate(tok, tmp_path):
    trainer = make_hf_trainer(
        tok,
        tmp_path,
        regularizers=[{"name": "multipliers", "lr_scale": 3.0}],
        max_steps=1,
        learning_rate=1e-3,
        weight_decay=0.1,
    )
    trainer.create_optimizer()
    name_of = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = {
        (g["weight_decay"], g["lr"]): sorted(name_of[id(p)] for p in g["params"])
        for g in trainer.optimizer.param_groups
    }
    mults = sorted(n for n in name_of.values() if is_multiplier(n))
    assert len(mults) == 2 * (7 * 2 + 1)  # rows + columns of 7 linears x 2 layers and the embedding
    assert groups[(2e-3, 3e-3)] == mults
    others = [n for key, names in groups.items() if key != (2e-3, 3e-3) for n in names]
    assert not any(is_multiplier(n) for n in others) and len(others) + len(mults) == len(name_of)
    assert set(groups) == {(2e-3, 3e-3), (0.1, 1e-3), (0.0, 1e-3)}  # matrices decay; norms do not


class _GradsAtStep(TrainerCallback):
    """The gradients the optimizer steps with: read after every clip, right before `optimizer.step()`."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}


def _step_grads(tok, tmp_path, trainer_max_grad_norm, **options):
    regs = [{"name": "multipliers", **options}]
    trainer = make_hf_trainer(tok, tmp_path, regularizers=regs, max_steps=1, max_grad_norm=trainer_max_grad_norm)
    probe = _GradsAtStep(trainer.model)
    trainer.add_callback(probe)
    trainer.train()
    metrics = next(h for h in trainer.state.log_history if "loss" in h)
    return probe.grads, metrics


def test_global_clip_skips_the_multipliers(tok, tmp_path):
    grads, _ = _step_grads(tok, tmp_path / "raw", trainer_max_grad_norm=0.0)  # no clipping anywhere
    mult = {n for n in grads if is_multiplier(n)}
    norm = torch.sqrt(sum(g.double().square().sum() for n, g in grads.items() if n not in mult)).item()
    mult_norm = torch.sqrt(sum(g.double().square().sum() for n, g in grads.items() if n in mult)).item()
    max_norm = 0.05
    assert norm > 10 * max_norm and mult_norm > 1e-3

    def close(got, factor_others, factor_mult):
        return all(
            torch.allclose(got[n], grads[n] * (factor_mult if n in mult else factor_others), rtol=1e-5, atol=1e-9)
            for n in grads
        )

    clipped, metrics = _step_grads(tok, tmp_path / "exclude", trainer_max_grad_norm=max_norm)
    assert metrics["reg/multipliers/grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert metrics["reg/multipliers/multiplier_grad_norm"] == pytest.approx(mult_norm, rel=1e-5)
    # non-multipliers scaled by max_norm / (norm over the non-multiplier gradients only); multipliers untouched
    assert close(clipped, max_norm / (norm + 1e-6), 1.0)
    assert not close(clipped, max_norm / (norm + 1e-6), max_norm / (norm + 1e-6))

    separate, _ = _step_grads(
        tok, tmp_path / "separate", trainer_max_grad_norm=max_norm, clip="separate", max_grad_norm=mult_norm / 4
    )
    assert close(separate, max_norm / (norm + 1e-6), (mult_norm / 4) / (mult_norm + 1e-6))

    included, _ = _step_grads(tok, tmp_path / "include", trainer_max_grad_norm=max_norm, clip="include")
    total = (norm**2 + mult_norm**2) ** 0.5
    assert close(included, max_norm / (total + 1e-6), max_norm / (total + 1e-6))


def test_logged_grad_norm_is_the_pre_clip_total_and_is_computed_once(tok, tmp_path):
    """The trainer's `grad_norm` log is the norm over all gradients before clipping, taken from the
    multipliers' own clip pass: the trainer's norm pass (accelerate's clip_grad_norm_) does not run."""
    grads, _ = _step_grads(tok, tmp_path / "raw", trainer_max_grad_norm=0.0)
    total = torch.sqrt(sum(g.double().square().sum() for g in grads.values())).item()
    trainer = make_hf_trainer(
        tok, tmp_path / "clip", regularizers=[{"name": "multipliers"}], max_steps=1, max_grad_norm=0.05
    )
    calls = []
    original = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda *a, **k: calls.append(1) or original(*a, **k)
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)["grad_norm"]
    assert logged == pytest.approx(total, rel=1e-5) and not calls
    vanilla = make_hf_trainer(tok, tmp_path / "vanilla", max_steps=1, max_grad_norm=0.05)
    vanilla.accelerator.clip_grad_norm_ = lambda *a, **k: calls.append(1) or original(*a, **k)
    vanilla.train()
    assert calls  # the probe sees the trainer's own norm pass when no regularizer computed the norm


def test_clip_leaves_the_updates_of_the_multipliers_unscaled(tok, tmp_path):
    """With plain SGD the multipliers' update is -lr * their raw gradient even when the others are clipped."""

    def deltas(out, max_grad_norm):
        trainer = make_hf_trainer(
            tok,
            out,
            max_steps=1,
            learning_rate=0.1,
            optim="sgd",
            max_grad_norm=max_grad_norm,
            regularizers=[{"name": "multipliers", "weight_decay": 0.0}],
        )
        before = weights(trainer.model)
        trainer.train()
        return {n: w - before[n] for n, w in weights(trainer.model).items()}

    raw, clipped = deltas(tmp_path / "a", 0.0), deltas(tmp_path / "b", 0.01)
    for n in raw:
        if is_multiplier(n):
            assert torch.allclose(clipped[n], raw[n], rtol=1e-4, atol=1e-8), n
    q = "model.layers.0.self_attn.q_proj.weight"
    assert clipped[q].norm() < 0.1 * raw[q].norm()


def test_interrupted_and_resumed_run_equals_uninterrupted(tok, tmp_path):
    from test_resume import KW, StopAt

    regs = [{"name": "multipliers"}]
    full = make_hf_trainer(tok, tmp_path / "full", regularizers=regs, **KW)
    full.train()
    first = make_hf_trainer(tok, tmp_path / "cut", regularizers=regs, **KW)
    first.add_callback(StopAt(3))
    first.train()
    resumed = make_hf_trainer(
        tok, tmp_path / "cut", regularizers=regs, model=tiny_llama(vocab_size=len(tok), seed=7), **KW
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert losses(full)[3:] == pytest.approx(losses(resumed)[-3:], rel=1e-5, abs=1e-6)
    final = weights(full.model)
    assert max_rel_diff(final, weights(resumed.model)) < 1e-5
    assert max((final[n] - 1).abs().max().item() for n in final if is_multiplier(n)) > 1e-3  # they did move
    # a checkpoint trained with other multipliers is refused
    other = make_hf_trainer(
        tok, tmp_path / "cut", regularizers=[{"name": "multipliers", "placement": "symmetry_aware"}], **KW
    )
    with pytest.raises(Exception, match="lrm_|other multipliers"):
        other.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))


# -- export ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tie,policy", [(False, "skip"), (True, "skip"), (True, "untie")], ids=["untied", "tied-skip", "tied-untie"]
)
def test_export_writes_a_plain_model_with_the_same_logits(tok, tmp_path, tie, policy):
    regs = [{"name": "multipliers", "tied_embeddings": policy}]
    model = tiny_llama(vocab_size=len(tok), seed=0, tie_word_embeddings=tie)
    trainer = make_hf_trainer(tok, tmp_path / "run", regularizers=regs, model=model, max_steps=4)
    trainer.train()
    trainer.save_model(str(tmp_path / "run" / "final"))
    moved = {n: p for n, p in trainer.model.named_parameters() if is_multiplier(n)}
    assert max((p - 1).abs().max().item() for p in moved.values()) > 1e-3
    assert any("embed_tokens" in n for n in moved) == (not tie or policy == "untie")

    result = export_plain(str(tmp_path / "run"), str(tmp_path / "plain"))
    assert result.untied == (tie and policy == "untie")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain"))
    assert not any(is_multiplier(n) for n, _ in plain.named_parameters())
    assert type(plain.model.layers[0].mlp.up_proj) is torch.nn.Linear
    tied_now = plain.lm_head.weight is plain.model.embed_tokens.weight
    assert tied_now == (tie and policy == "skip")
    assert not hasattr(plain.config, "llmreg_multipliers")
    trainer.model.eval()
    ids = _ids(len(tok), seed=3)
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - trainer.model(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5
    with pytest.raises(ConfigError, match="not empty"):
        export_plain(str(tmp_path / "run"), str(tmp_path / "plain"))
    with pytest.raises(ConfigError, match="holds no multipliers"):
        export_plain(str(tmp_path / "plain"), str(tmp_path / "again"))


def test_saved_run_dir_holds_wrapped_weights_and_says_so(tok, tmp_path):
    trainer = make_hf_trainer(tok, tmp_path, regularizers=["multipliers"], max_steps=1)
    trainer.save_model(str(tmp_path / "final"))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "final" / "model.safetensors")).keys()
    assert "model.layers.0.self_attn.q_proj.lrm_row" in keys and "model.layers.0.self_attn.q_proj.weight" in keys
    import json

    note = json.load(open(tmp_path / "final" / "config.json"))["llmreg_multipliers"]
    assert note["placement"] == "all" and "llmreg export" in note["note"]


# -- errors ---------------------------------------------------------------------------------------------


def test_clear_errors():
    with pytest.raises(ConfigError, match=r"placement: expected one of \['all', 'symmetry_aware'"):
        llmreg.build_regularizer({"name": "multipliers", "placement": "symetry_aware"})
    with pytest.raises(ConfigError, match="unknown placement 'rows'"):
        plan_for_model(tiny_llama(vocab_size=60), "rows")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))  # Conv1D, not nn.Linear
    with pytest.raises(ConfigError, match="decoder blocks hold transformers Conv1D layers"):
        _wrapped(gpt2)
    with pytest.raises(ConfigError, match="no rule for"):
        _wrapped(tiny_llama(vocab_size=60), placement="symmetry_aware", symmetry_table={"q_proj": "row"})
    with pytest.raises(ConfigError, match="unknown multiplier kind"):
        llmreg.build_regularizer({"name": "multipliers", "symmetry_table": {"q_proj": "rows"}})
    with pytest.raises(ConfigError, match="needs mup_values"):
        llmreg.build_regularizer({"name": "multipliers", "init": "mup"})
    model = tiny_llama(vocab_size=60)
    _wrapped(model)
    with pytest.raises(ConfigError, match="already carries multipliers"):
        _wrapped(model)


def test_mup_init_scales_the_layer_from_the_start():
    plain, wrapped = tiny_llama(vocab_size=60), tiny_llama(vocab_size=60)
    _wrapped(wrapped, init="mup", mup_values={"down_proj": 0.5})
    layer = wrapped.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        assert torch.allclose(layer(x), 0.5 * plain.model.layers[0].mlp.down_proj(x), atol=1e-6)
    assert torch.equal(layer.lrm_col, torch.ones_like(layer.lrm_col))


def test_attach_reads_zero3_placeholder_shapes():
    """Under zero.Init a weight is an empty placeholder; the multipliers take their size from ds_shape."""
    lin = torch.nn.Linear(6, 4)
    holder = torch.nn.Module()
    holder.proj = lin
    real = lin.weight.detach().clone()
    lin.weight = torch.nn.Parameter(torch.empty(0))
    lin.weight.ds_shape = real.shape
    attach(holder, {"proj": LayerPlan(row=True, col=True)})
    assert lin.lrm_row.shape == (4,) and lin.lrm_col.shape == (6,)


# -- recipe and command line ----------------------------------------------------------------------------

QUICKSTART = os.path.join(REPO, "recipes", "multipliers", "quickstart.yaml")


def test_quickstart_recipe_validates(nothing_loads):  # noqa: F811  (the fixture imported above)
    from llmreg.recipe import load_recipe

    recipe = load_recipe(QUICKSTART)
    assert recipe.trainer.kind == "hf" and recipe.model.config == {"size": "tiny"}
    assert recipe.regularizers == [{"name": "multipliers", "placement": "all", "weight_decay": 2e-3, "lr_scale": 1.0}]
    assert recipe.trainer.args["max_grad_norm"] == 1.0 and recipe.trainer.args["weight_decay"] == 0.1
    with pytest.raises(ConfigError, match="placement"):
        load_recipe(QUICKSTART, ["regularizers.0.placement=rows"])


NO_LLMREG = """
import sys, json, torch
sys.modules["llmreg"] = None  # any import of llmreg fails: the exported model must not need it
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
"""


@pytest.mark.slow
def test_cli_train_then_export_loads_without_llmreg(tmp_path):
    from safetensors.torch import load_file
    from test_cli import cli, run
    from transformers import AutoConfig, LlamaForCausalLM

    out, plain = tmp_path / "run", tmp_path / "plain"
    trained = cli(
        "train", QUICKSTART, f"output_dir={out}", "trainer.max_steps=6", "trainer.save_steps=6", "data.num_examples=64"
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = cli("export", str(out), str(plain))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"done: merged the multipliers of 15 layers from {out / 'final'} into {plain}" in exported.stdout
    assert cli("export", str(out), str(plain)).returncode == 2  # not empty, no --overwrite

    # the wrapped model, rebuilt with the regularizer's own surgery from the run's final/ weights
    wrapped = LlamaForCausalLM(AutoConfig.from_pretrained(out / "final"))
    _wrapped(wrapped)
    wrapped.load_state_dict(load_file(str(out / "final" / "model.safetensors")), strict=True)
    assert max((p - 1).abs().max().item() for n, p in wrapped.named_parameters() if is_multiplier(n)) > 1e-4
    ids = _ids(wrapped.config.vocab_size, seed=5)
    script = tmp_path / "load.py"
    script.write_text(NO_LLMREG)
    loaded = run(
        [sys.executable, str(script), str(plain), json.dumps(ids.tolist()), str(tmp_path / "logits.pt")],
        cwd=str(tmp_path),
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    with torch.no_grad():
        diff = (torch.load(tmp_path / "logits.pt") - wrapped.eval()(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5


def test_combines_with_the_weight_decay_policy(tok, tmp_path):
    regs = ["multipliers", {"name": "weight_decay", "weight_decay": 0.1}]
    trainer = make_hf_trainer(tok, tmp_path, regularizers=regs, max_steps=1)
    trainer.create_optimizer()
    name_of = {id(p): n for n, p in trainer.model.named_parameters()}
    wd = {name_of[id(p)]: g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {wd[n] for n in wd if is_multiplier(n)} == {2e-3}
    assert wd["model.layers.0.mlp.up_proj.weight"] == 0.1
    assert wd["model.embed_tokens.weight"] == 0.0 and wd["model.norm.weight"] == 0.0  # the policy's no_decay


def test_loading_a_wrapped_model_folder_is_refused_with_the_export_hint(tok, tmp_path, capsys):
    """transformers would drop the lrm_* tensors and load another model: recipes and eval refuse the folder."""
    from llmreg.cli import main
    from llmreg.recipe import load_recipe
    from llmreg.recipe.models import build_model

    trainer = make_hf_trainer(tok, tmp_path, regularizers=["multipliers"], max_steps=1)
    trainer.save_model(str(tmp_path / "final"))
    recipe = load_recipe(QUICKSTART, [f"model.name_or_path={tmp_path / 'final'}", "model.config=null"])
    with pytest.raises(ConfigError, match=r"holds learnable multipliers .* llmreg export"):
        build_model(recipe, tok, trainer.args)
    suite = os.path.join(REPO, "eval", "suites", "stories260k.yaml")
    assert (
        main(
            [
                "eval",
                "--suite",
                suite,
                "--model",
                str(tmp_path / "final"),
                "--model",
                str(tmp_path / "final"),
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 2
    )
    assert "holds learnable multipliers" in capsys.readouterr().err
    export_plain(str(tmp_path / "final"), str(tmp_path / "plain"))
    recipe = load_recipe(QUICKSTART, [f"model.name_or_path={tmp_path / 'plain'}", "model.config=null"])
    assert not any(is_multiplier(n) for n, _ in build_model(recipe, tok, trainer.args).named_parameters())


def test_placement_none_adds_nothing_and_marks_nothing():
    model = tiny_llama(vocab_size=60)
    before = set(dict(model.named_parameters()))
    reg = _wrapped(model, placement="none")
    assert reg.names == [] and set(dict(model.named_parameters())) == before
    assert not hasattr(model.config, "llmreg_multipliers")
