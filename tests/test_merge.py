"""`llmreg merge` (llmreg.eval.merge): WiSE-FT interpolation of full fine-tunes and PEFT adapters with their base."""

from __future__ import annotations

import json
import os

import pytest
import torch

from llmreg.cli import main

TOL = 1e-6


def _save(model, tok, folder) -> str:
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def _state(path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))  # stock transformers
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture
def pair(tmp_path, tok):
    """A base model folder and a run folder whose final/ holds a 'fine-tuned' model (the base, perturbed)."""
    from llmreg.data import tiny_llama

    base = tiny_llama(vocab_size=len(tok), seed=0)
    tuned = tiny_llama(vocab_size=len(tok), seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return _save(base, tok, tmp_path / "base"), _save(tuned, tok, tmp_path / "run" / "final")


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=TOL, rtol=0) for k in a)


def test_full_finetune_alpha_0_half_1(tmp_path, pair, capsys):
    base, final = pair
    out = tmp_path / "merged"
    run_dir = os.path.dirname(final)  # a run directory resolves to its final/
    assert main(["merge", "--base", base, "--tuned", run_dir, "--alpha", "0,0.5,1", "--out", str(out)]) == 0
    assert "done: " in capsys.readouterr().out
    b, t = _state(base), _state(final)
    assert _close(_state(out / "alpha-0"), b)
    assert _close(_state(out / "alpha-1"), t)
    half = _state(out / "alpha-0.5")
    assert _close(half, {k: (b[k] + t[k]) / 2 for k in b})
    assert not _close(half, b) and not _close(half, t)
    assert (out / "alpha-0.5" / "tokenizer.json").is_file()
    meta = json.loads((out / "alpha-0.5" / "llmreg_merge.json").read_text())
    assert meta == {"base": base, "tuned": final, "adapter": False, "alpha": 0.5}
    # an existing output is not replaced silently
    assert main(["merge", "--base", base, "--tuned", run_dir, "--alpha", "0.5", "--out", str(out)]) == 2
    assert "exists already; add --overwrite" in capsys.readouterr().err


def test_lora_adapter_equals_merging_with_scaling_times_alpha(tmp_path, tok, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmreg.data import tiny_llama

    base = _save(tiny_llama(vocab_size=len(tok), seed=0), tok, tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(2)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    adapter.save_pretrained(str(tmp_path / "lora"))
    tok.save_pretrained(str(tmp_path / "lora"))
    out = tmp_path / "merged"
    argv = ["merge", "--base", base, "--tuned", str(tmp_path / "lora"), "--alpha", "0.25,0.5,1", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    for alpha in (0.25, 0.5, 1.0):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "lora"))
        for module in model.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling = {name: s * alpha for name, s in module.scaling.items()}
        expected = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
        merged = _state(out / f"alpha-{alpha:g}")
        assert _close(merged, expected), alpha
        assert not _close(merged, _state(base))
    assert json.loads((out / "alpha-0.5" / "llmreg_merge.json").read_text())["adapter"] is True


@pytest.fixture
def nothing_loads_weights(monkeypatch):
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("merge loaded a model before refusing")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def test_two_architectures_are_refused_in_one_line_before_loading(tmp_path, pair, tok, capsys, nothing_loads_weights):
    from transformers import GPT2Config, GPT2LMHeadModel

    base, _ = pair
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    )
    other = _save(gpt2, tok, tmp_path / "gpt2")
    capsys.readouterr()
    assert main(["merge", "--base", base, "--tuned", other, "--alpha", "0.5", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: merge: different architectures: model_type 'gpt2'") and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_shape_mismatch_and_bad_alpha_and_missing_model(tmp_path, pair, tok, capsys, nothing_loads_weights):
    from llmreg.data import tiny_llama

    base, final = pair
    wide = _save(tiny_llama(vocab_size=len(tok), seed=0, hidden_size=32), tok, tmp_path / "wide")
    capsys.readouterr()
    cases = [
        (["--tuned", wide, "--alpha", "0.5"], "error: merge: hidden_size 32 of"),
        (["--tuned", final, "--alpha", "half"], "error: merge: --alpha takes numbers"),
        (["--tuned", str(tmp_path / "nope"), "--alpha", "0.5"], "error: merge --tuned: model path not found"),
    ]
    for args, message in cases:
        assert main(["merge", "--base", base, *args, "--out", str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err


def test_cli_exit_code_2_in_a_subprocess(tmp_path, pair, tok):
    from test_cli import cli
    from transformers import GPT2Config, GPT2LMHeadModel

    base, _ = pair
    other = _save(
        GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2)
        ),
        tok,
        tmp_path / "g",
    )
    result = cli("merge", "--base", base, "--tuned", other, "--alpha", "0.5", "--out", str(tmp_path / "m"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def test_gguf_base(tmp_path, monkeypatch, capsys):
    from test_gguf import write_tiny_gguf
    from transformers import AutoModelForCausalLM

    from llmreg.recipe import gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache-a"))
    base_folder = gguf.gguf_model_folder(path)
    tuned = AutoModelForCausalLM.from_pretrained(base_folder)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.1)
    tuned.save_pretrained(str(tmp_path / "tuned"))
    # an empty cache: the config comes from the file's header (no `architectures` there), then it converts
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache-b"))
    argv = ["merge", "--base", path, "--tuned", str(tmp_path / "tuned"), "--alpha", "0.5", "--out", str(tmp_path / "m")]
    assert main(argv) == 0, capsys.readouterr().err
    b, t = _state(base_folder), _state(tmp_path / "tuned")
    assert _close(_state(tmp_path / "m" / "alpha-0.5"), {k: (b[k] + t[k]) / 2 for k in b})
    assert (tmp_path / "m" / "alpha-0.5" / "tokenizer.json").is_file()  # the base's: the tuned folder has none
