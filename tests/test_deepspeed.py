"""Two-process DeepSpeed (CPU, gloo) against one process: l2_sp and weight_decay under ZeRO-2 and ZeRO-3.

Each case trains the same tiny Llama for 3 steps with the same global batch, once in one process and once
with `torchrun --nproc_per_node 2` under DeepSpeed, and compares final weights, the optimizer's groups and
the size of the anchors each rank keeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, max_rel_diff

from llmreg.core import ConfigError
from llmreg.integrations.deepspeed import check_deepspeed_config

WORKER = os.path.join(REPO, "tests", "workers", "train_worker.py")
STACK = [{"name": "weight_decay", "weight_decay": 0.1}, {"name": "l2_sp", "lam": 1.0}]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    return env


def _run(out, zero: int, regularizers, *extra: str) -> dict:
    args = [WORKER, "--zero", str(zero), "--out", str(out), "--regularizers", json.dumps(regularizers), *extra]
    if zero:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + zero + os.getpid() % 500),
            *args,
        ]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(os.path.join(out, "result.pt"), weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), 0, STACK)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_zero_matches_single_process(zero, single, tmp_path):
    dist = _run(tmp_path, zero, STACK)
    assert dist["world"] == 2
    # the same losses and, after 3 steps, the same weights within 1e-5 relative
    assert dist["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert max_rel_diff(single["weights"], dist["weights"]) < 1e-5
    # the gradient edit ran through the shim: the penalty grows from 0 as in the single process
    pen = [m["reg/l2_sp/penalty"] for m in dist["metrics"]]
    assert pen[0] == 0.0 and pen[-1] > 0.0
    assert pen == pytest.approx([m["reg/l2_sp/penalty"] for m in single["metrics"]], rel=1e-4)
    # weight_decay: every rank's optimizer holds exactly the policy's groups
    expected = sorted((g["weight_decay"], tuple(g["names"])) for g in single["per_rank"][0]["groups"])
    assert {0.0, 0.1} == {wd for wd, _ in expected}
    for rank in dist["per_rank"]:
        assert sorted((g["weight_decay"], tuple(g["names"])) for g in rank["groups"]) == expected
    # l2_sp keeps only this rank's shard of the anchors: about half of the model each
    total = sum(w.numel() for w in single["weights"].values())
    assert single["per_rank"][0]["stored"]["l2_sp.anchors"] == total
    for rank in dist["per_rank"]:
        assert rank["stored"]["l2_sp.anchors"] <= total // 2 + 64
    assert sum(r["stored"]["l2_sp.anchors"] for r in dist["per_rank"]) >= total


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from conftest import random_artifact

    from llmreg.data import build_char_tokenizer, tiny_llama

    model = tiny_llama(vocab_size=len(build_char_tokenizer()), seed=0)  # the worker's model
    return random_artifact(tmp_path_factory.mktemp("imp") / "importance", model, scale=100.0, layer_scale={"1": 3.0})


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_forgetting_penalty_under_zero_matches_single_process(zero, artifact, tmp_path):
    stack = [{"name": "forgetting_penalty", "artifact": artifact, "lam": 0.05, "layer_temperature": 1e-4}]
    single = _run(tmp_path / "single", 0, stack)
    dist = _run(tmp_path / "dist", zero, stack)
    assert dist["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert max_rel_diff(single["weights"], dist["weights"]) < 1e-5
    pen = [m["reg/forgetting_penalty/penalty"] for m in dist["metrics"]]
    assert pen[-1] > 0 and pen == pytest.approx(
        [m["reg/forgetting_penalty/penalty"] for m in single["metrics"]], rel=1e-4
    )
    coef = single["metrics"][0]
    assert 0.01 < coef["reg/forgetting_penalty/layer_coef/0"] < 0.49  # the softmax is neither flat nor one-hot
    # the penalty moved the weights: plain training ends elsewhere
    assert max_rel_diff(single["weights"], _run(tmp_path / "plain", 0, [])["weights"]) > 1e-4
    # each rank holds only its shard of the anchors and of the importance (the 14 decoder-layer matrices)
    regularised = sum(w.numel() for n, w in single["weights"].items() if n.startswith("model.layers.") and w.ndim == 2)
    for key in ("anchors", "importance"):
        assert single["per_rank"][0]["stored"][f"forgetting_penalty.{key}"] == regularised
        sizes = [r["stored"][f"forgetting_penalty.{key}"] for r in dist["per_rank"]]
        assert all(s <= regularised // 2 + 64 for s in sizes), sizes
        assert sum(sizes) >= regularised


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_si_importance_under_zero_matches_single_process(zero, tmp_path):
    from llmreg.regularizers.forgetting import artifact as art

    stack = [{"name": "si_importance", "xi": 1e-3}]
    single = _run(tmp_path / "single", 0, stack, "--importance-out", str(tmp_path / "imp1"))
    dist = _run(tmp_path / "dist", zero, stack, "--importance-out", str(tmp_path / "imp2"))
    assert max_rel_diff(single["weights"], dist["weights"]) < 1e-5
    one, two = art.read_meta(tmp_path / "imp1"), art.read_meta(tmp_path / "imp2")
    assert one["parameters"] == two["parameters"] and one["steps"] == two["steps"] == 3
    a = art.load_importance(str(tmp_path / "imp1"), one["parameters"])
    b = art.load_importance(str(tmp_path / "imp2"), one["parameters"])
    assert max_rel_diff(a, b) < 1e-3 and all(t.abs().sum() > 0 for t in a.values())
    for which in ("start", "end"):
        assert two["anchor_sum_sq"][which] == pytest.approx(one["anchor_sum_sq"][which], rel=1e-6)
    # the path integral and start weights are kept as local shards
    regularised = sum(t.numel() for t in a.values())
    for rank in dist["per_rank"]:
        assert rank["stored"]["si_importance.omega"] <= regularised // 2 + 64


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_half_ft_under_zero_freezes_the_same_set_and_matches_single_process(zero, tmp_path):
    import llmreg
    from llmreg.data import build_char_tokenizer, tiny_llama

    stack = [{"name": "half_ft", "seed": 4}]
    start = tiny_llama(vocab_size=len(build_char_tokenizer()), seed=0)  # the worker's model
    reg = llmreg.build_regularizer(stack[0])
    reg.setup(start, trainer=None)
    frozen = set(reg.frozen)
    trainable = sum(p.numel() for n, p in start.named_parameters() if n not in frozen)
    single = _run(tmp_path / "single", 0, stack)
    dist = _run(tmp_path / "dist", zero, stack)
    assert dist["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert max_rel_diff(single["weights"], dist["weights"]) < 1e-5
    for name, p in start.named_parameters():
        if name in frozen:
            assert torch.equal(dist["weights"][name], p.detach()), f"frozen {name} moved under ZeRO-{zero}"
        else:
            assert not torch.equal(dist["weights"][name], p.detach()), f"trainable {name} did not move"
    # Adam state only for the trainable half: exactly its elements in one process, split (with at most a
    # little alignment padding) across the two ranks under ZeRO
    assert single["per_rank"][0]["adam_exp_avg_numel"] == trainable
    ranks = [r["adam_exp_avg_numel"] for r in dist["per_rank"]]
    assert trainable <= sum(ranks) <= trainable + 64 and max(ranks) <= trainable // 2 + 64, ranks


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_multipliers_under_zero_match_single_process(zero, tmp_path):
    """Surgery in setup (on zero.Init placeholders under ZeRO-3), the multipliers' own group, and the clip over
    the non-multiplier gradients through the pre-step shim (DeepSpeed's own clipping switched off)."""
    from llmreg.regularizers.multipliers import is_multiplier

    stack = [{"name": "multipliers", "lr_scale": 0.5}]
    clip = ("--max-grad-norm", "0.05")  # well below the gradient norm: the clip acts on every step
    single = _run(tmp_path / "single", 0, stack, *clip)
    dist = _run(tmp_path / "dist", zero, stack, *clip, "--save-final", str(tmp_path / "final"))
    assert dist["losses"] == pytest.approx(single["losses"], rel=1e-5)
    mults = sorted(n for n in single["weights"] if is_multiplier(n))
    assert len(mults) == 2 * (7 * 2 + 1) and set(dist["weights"]) == set(single["weights"])
    assert max_rel_diff(single["weights"], dist["weights"]) < 1e-5  # multipliers included
    assert max((single["weights"][n] - 1).abs().max().item() for n in mults) > 1e-3
    norms = [m["reg/multipliers/grad_norm"] for m in dist["metrics"]]
    assert min(norms) > 0.5 and norms == pytest.approx(
        [m["reg/multipliers/grad_norm"] for m in single["metrics"]], rel=1e-4
    )
    for rank in dist["per_rank"]:
        assert rank["ds_gradient_clipping"] == 0.0
        groups = {g["weight_decay"]: g["names"] for g in rank["groups"]}
        assert groups[2e-3] == mults
    # the gathered final/ exports to a plain model with the logits of the single-process wrapped model
    from transformers import AutoModelForCausalLM

    import llmreg
    from llmreg.data import build_char_tokenizer, tiny_llama
    from llmreg.regularizers.multipliers.export import export_plain

    export_plain(str(tmp_path / "final"), str(tmp_path / "plain"))
    wrapped = tiny_llama(vocab_size=len(build_char_tokenizer()), seed=0)
    llmreg.build_regularizer(stack[0]).setup(wrapped, trainer=None)
    wrapped.load_state_dict(single["weights"], strict=True)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain"))
    ids = torch.arange(40).reshape(2, 20) % wrapped.config.vocab_size
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - wrapped(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4


def test_optimizer_block_is_refused_with_one_line_error(tmp_path):
    cfg = json.load(open(os.path.join(REPO, "ds_configs", "zero2.json")))
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'optimizer' block") as err:
        check_deepspeed_config(str(path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_shipped_configs_have_auto_fields_and_no_optimizer(name):
    cfg = json.load(open(os.path.join(REPO, "ds_configs", name)))
    check_deepspeed_config(cfg)
    assert "scheduler" not in cfg
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto"


def test_trainer_refuses_optimizer_block_when_groups_are_set(tmp_path):
    cfg = json.load(open(os.path.join(REPO, "ds_configs", "zero2.json")))
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))

    class Args:  # only what the mixin reads before the parent is built
        deepspeed = str(path)

    from llmreg import RegTrainer

    with pytest.raises(ConfigError, match="drop llmreg's parameter groups"):
        RegTrainer(model=None, args=Args(), regularizers=["weight_decay"])


def test_accelerate_backward_still_steps_inside_backward():
    """The shim copies the shape of accelerate's DeepSpeedEngineWrapper.backward; fail loudly if it changes."""
    import inspect

    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    src = inspect.getsource(DeepSpeedEngineWrapper.backward)
    assert "self.engine.backward(loss" in src and "self.engine.step()" in src
    assert "set_gradient_accumulation_boundary" in src


LFU_CASES = {  # name -> (regularizer, worker flags); peft: the ascent step on the trained adapter itself
    "reps": ({"name": "lfu", "aux": "reps", "alpha": 1.0, "sync_ascent_grad": True}, ()),
    "lora": ({"name": "lfu", "aux": "lora", "alpha": 1.0, "sync_ascent_grad": True}, ()),
    "peft": ({"name": "lfu", "aux": "lora", "alpha": 1.0, "sync_ascent_grad": True}, ("--peft",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("aux", sorted(LFU_CASES))
@pytest.mark.parametrize("zero", [2, 3])
def test_lfu_under_zero_matches_single_process(zero, aux, tmp_path):
    """LfU's ascent gradient (autograd.grad on its own zero leaves, never on DeepSpeed-managed parameters) and
    its second forward run under ZeRO-2/3; with the ascent gradient all-reduced every rank takes the single
    process's delta, and the consistency is normalised by the global token count, so the losses agree."""
    spec, flags = LFU_CASES[aux]
    stack = [spec]
    single = _run(tmp_path / "single", 0, stack, *flags)
    dist = _run(tmp_path / "dist", zero, stack, *flags)
    assert dist["world"] == 2
    assert dist["losses"][0] == pytest.approx(single["losses"][0], rel=1e-4)
    assert dist["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert max_rel_diff(single["weights"], dist["weights"]) < 1e-4
    cons = [m["reg/lfu/consistency"] for m in single["metrics"]]
    assert all(c > 1e-3 for c in cons)  # the term is really part of the compared loss
    # and it changes training: plain SFT ends elsewhere
    assert max_rel_diff(single["weights"], _run(tmp_path / "plain", 0, [], *flags)["weights"]) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_noisefit_under_zero_matches_single_process(zero, tmp_path):
    """Two ranks x micro-batch 4 against one process with two accumulation steps of 4 over the same slices of the
    global batch: the noise of a slice is seeded by (seed, step, shard = micro * world + rank), so both runs draw
    the same noise per slice, and the per-slice statistics (std, mean variance) are the same too."""
    # ZeRO-3 also recomputes the chunked LM head in backward (a gathered module run again outside the forward)
    stack = [
        {"name": "noisefit", "num_layers": 1, "noise_std": 1.0, "recompute_logits": "always" if zero == 3 else "auto"}
    ]
    single = _run(tmp_path / "single", 0, stack, "--grad-accum", "2")
    dist = _run(tmp_path / "dist", zero, stack)
    assert dist["world"] == 2
    assert dist["losses"][0] == pytest.approx(single["losses"][0], rel=1e-4, abs=1e-4)
    assert dist["losses"] == pytest.approx(single["losses"], rel=1e-4)
    assert max_rel_diff(single["weights"], dist["weights"]) < 1e-4
    # the noise is in play (the logged term is rank 0's micro-batch mean, so it is not compared)
    assert min(m["reg/noisefit/soft"] for m in dist["metrics"]) > 1e-6
    # the hybrid loss moved the weights elsewhere than plain training
    assert max_rel_diff(single["weights"], _run(tmp_path / "plain", 0, [], "--grad-accum", "2")["weights"]) > 1e-4


@pytest.mark.slow
def test_noisefit_v2_calibration_under_zero3_matches_single_process(tmp_path):
    """v2: each rank scores its own calibration batches and the sums are all-reduced; rank r draws global batches
    r*n .. r*n+n-1, so two ranks x 1 batch score what one process scores with 2, and train the same."""
    stack = [{"name": "noisefit", "version": "v2", "calib_batch_size": 2}]
    single = _run(tmp_path / "single", 0, [{**stack[0], "calib_batches": 2}], "--grad-accum", "2")
    dist = _run(tmp_path / "dist", 3, [{**stack[0], "calib_batches": 1}])
    assert dist["losses"] == pytest.approx(single["losses"], rel=1e-4)
    assert max_rel_diff(single["weights"], dist["weights"]) < 1e-4
    assert min(m["reg/noisefit/soft"] for m in dist["metrics"]) > 0
