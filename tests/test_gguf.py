"""GGUF checkpoints (llmreg.recipe.gguf): a tiny GGUF written here with the gguf package trains through a recipe,
its de-quantised copy is cached by content hash and reused, and bad input is one line before anything loads."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import yaml

from llmreg.cli import main
from llmreg.recipe import gguf as gguf_mod
from llmreg.recipe import load_recipe
from llmreg.recipe.run import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.abspath(
    os.path.join(REPO, "..", "shared", "data", "models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
)


def write_tiny_gguf(path, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 128):
    """A Llama GGUF as llama.cpp lays one out: byte-level BPE vocabulary, F32 norms and embeddings, Q8_0 matrices."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3])
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(len(tokens) - 3)
    writer.add_eos_token_id(len(tokens) - 3)

    def tensor(name, shape, quantise=False):
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if quantise:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, data)

    kv = kv_heads * hidden // heads
    tensor("token_embd.weight", (len(tokens), hidden))
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,))
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,))
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden))):
            tensor(f"blk.{i}.{name}.weight", shape, quantise=True)
        tensor(f"blk.{i}.attn_output.weight", (hidden, hidden), quantise=True)
        for name, shape in (("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            tensor(f"blk.{i}.{name}.weight", shape, quantise=True)
    tensor("output_norm.weight", (hidden,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh GGUF cache, and a probe counting de-quantisations."""
    root = tmp_path / "gguf-cache"
    monkeypatch.setenv(gguf_mod.CACHE_ENV, str(root))
    calls = []
    real = gguf_mod.dequantise
    monkeypatch.setattr(gguf_mod, "dequantise", lambda path: calls.append(path) or real(path))
    return root, calls


def _recipe(tmp_path, name: str, model: dict, steps: int = 3, max_length: int = 32, **sections) -> str:
    raw = {
        "model": model,
        "data": {"train": "builtin:arithmetic", "num_examples": 16},
        "trainer": {
            "kind": "sft",
            "max_steps": steps,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-3,
            "max_length": max_length,
            "logging_steps": 1,
            "save_strategy": "no",
            "activation_checkpointing": False,
            "disable_tqdm": True,
        },
        "output_dir": str(tmp_path / name),
        "seed": 0,
        **sections,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_gguf_trains_saves_a_stock_model_and_the_second_load_hits_the_cache(tmp_path, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, calls = cache
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = write_tiny_gguf(folder / "tiny.gguf")
    recipe = load_recipe(_recipe(tmp_path, "run", {"name_or_path": str(folder), "gguf_file": "tiny.gguf"}))
    assert recipe.tokenizer.gguf_file == "tiny.gguf"  # the tokenizer follows the model

    result = train(recipe)
    assert len(calls) == 1
    cached = root / gguf_mod.content_hash(path)
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    # the cache holds what transformers' GGUF loader de-quantises, weight for weight
    direct = _state(gguf_mod.dequantise(path))
    start = _state(AutoModelForCausalLM.from_pretrained(str(cached)))
    assert direct.keys() == start.keys() and all(torch.equal(direct[k], start[k]) for k in direct)

    final = os.path.join(recipe.output_dir, "final")
    trained = AutoModelForCausalLM.from_pretrained(final)  # stock transformers, no gguf_file
    assert getattr(trained, "hf_quantizer", None) is None
    assert any(not torch.equal(start[k], v) for k, v in _state(trained).items())
    assert AutoTokenizer.from_pretrained(final)("the")["input_ids"] == [83, 257]
    assert result is not None
    # the second run, and `llmreg eval`'s loader for DIR/NAME.gguf, read the cache: no de-quantisation
    calls.clear()
    train(load_recipe(_recipe(tmp_path, "again", {"name_or_path": f"{folder}/tiny.gguf"}, steps=1)))
    from llmreg.eval.run import _load_model

    model, tok = _load_model(path, None)
    assert calls == []
    assert all(torch.equal(start[k], v) for k, v in _state(model).items())
    assert tok("the")["input_ids"] == [83, 257]


def test_importance_from_a_gguf(tmp_path, cache):
    from llmreg.regularizers.forgetting import artifact

    _, calls = cache
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    recipe = _recipe(tmp_path, "ewc", {"name_or_path": path}, importance={"method": "ewc", "num_samples": 4})
    assert main(["importance", recipe]) == 0
    meta = artifact.read_meta(tmp_path / "ewc" / "importance")
    assert meta["method"] == "ewc" and meta["model"] == path and len(calls) == 1


def test_eval_takes_a_gguf_path_as_base_and_model(tmp_path, cache):
    import json

    _, calls = cache
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    suite = os.path.join(REPO, "eval", "suites", "stories260k.yaml")  # local tasks on ../shared/data
    argv = ["eval", "--suite", suite, "--base", path, "--model", path, "--out", str(tmp_path / "report")]
    assert main([*argv, "--limit", "2", "--cache-dir", str(tmp_path / "scores")]) == 0
    report = json.loads((tmp_path / "report" / "forgetting_report.json").read_text())
    assert set(report["base"]) == {"gsm8k_ppl", "tinystories_ppl"} and len(calls) == 1  # converted once for both


def test_tokenizer_alone_from_a_gguf_converts_no_weights(tmp_path, cache):
    root, calls = cache
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    from llmreg.recipe.models import build_tokenizer
    from llmreg.recipe.schema import TokenizerSpec

    tok = build_tokenizer(TokenizerSpec(name_or_path=str(tmp_path), gguf_file="tiny.gguf"))
    assert len(tok) == 261 and calls == []
    assert not (root / gguf_mod.content_hash(path) / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"name_or_path": "{dir}", "gguf_file": "nope.gguf"}, "model.gguf_file: GGUF file not found: "),
        ({"name_or_path": "{dir}/nope.gguf"}, "model.name_or_path: path not found"),
        ({"config": {"size": "tiny"}, "gguf_file": "x.gguf"}, "model.gguf_file: set model.name_or_path"),
    ],
)
def test_missing_gguf_file_is_one_line_exit_2(tmp_path, capsys, model, message):
    model = {k: v.replace("{dir}", str(tmp_path)) if isinstance(v, str) else v for k, v in model.items()}
    assert main(["validate", _recipe(tmp_path, "run", model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_missing_gguf_package_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import importlib.util

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")  # never read: the package check comes first
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    assert main(["validate", _recipe(tmp_path, "run", {"name_or_path": str(path)})]) == 2
    err = capsys.readouterr().err
    assert err == "error: model.gguf_file: loading m.gguf needs the gguf package: pip install 'llmreg[gguf]'\n"
    suite = os.path.join(REPO, "eval", "suites", "testbed.yaml")
    assert main(["eval", "--suite", suite, "--base", str(path), "--model", str(tmp_path), "--out", "x"]) == 2
    assert "eval: loading m.gguf needs the gguf package" in capsys.readouterr().err


def test_eval_refuses_a_missing_gguf_before_loading(tmp_path, capsys):
    suite = os.path.join(REPO, "eval", "suites", "testbed.yaml")
    missing = str(tmp_path / "nope.gguf")
    assert main(["eval", "--suite", suite, "--base", missing, "--model", str(tmp_path), "--out", "x"]) == 2
    assert capsys.readouterr().err == f"error: eval: GGUF file not found: {missing}\n"


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_tiny_gguf_under_two_process_zero_converts_once(tmp_path, zero):
    from test_cli import _torchrun

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    recipe = _recipe(tmp_path, "run", {"name_or_path": path})
    env_before = os.environ.get(gguf_mod.CACHE_ENV)
    os.environ[gguf_mod.CACHE_ENV] = str(tmp_path / "cache")
    try:
        result = _torchrun("train", recipe, f"trainer.deepspeed=ds_configs/{zero}.json")
    finally:
        os.environ.pop(gguf_mod.CACHE_ENV)
        if env_before is not None:
            os.environ[gguf_mod.CACHE_ENV] = env_before
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("de-quantising") == 1  # rank 0 converted, rank 1 read the cache
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_real_smollm2_gguf_trains_3_steps_and_reloads_from_the_cache(tmp_path, cache):
    from transformers import AutoModelForCausalLM

    root, calls = cache
    overrides = ["trainer.max_steps=3", "trainer.max_length=32", f"output_dir={tmp_path / 'run'}"]
    recipe = load_recipe(os.path.join(REPO, "recipes", "gguf", "smollm2_sft.yaml"), overrides)  # the shipped one
    assert recipe.model.describe() == REAL
    start = time.perf_counter()
    train(recipe)
    first = time.perf_counter() - start
    assert len(calls) == 1
    model = AutoModelForCausalLM.from_pretrained(os.path.join(recipe.output_dir, "final"))
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    start = time.perf_counter()
    cached = gguf_mod.gguf_model_folder(REAL)
    AutoModelForCausalLM.from_pretrained(cached)
    second = time.perf_counter() - start
    assert calls == [REAL] and second < 20, second
    print(f"real GGUF: first run (conversion + 3 steps) {first:.1f} s, cached load {second:.1f} s")
