"""Tiny Llama-style models built from config, for tests, the quickstart and benchmarks."""

from __future__ import annotations

from typing import Any

SIZES: dict[str, dict[str, Any]] = {
    # 2 layers, hidden 64: trains a few hundred steps on a CPU in seconds
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    # about 20M parameters (8 layers, hidden 384, vocabulary 8000): the default benchmark model
    "default": dict(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=1024,
        vocab_size=8000,
    ),
}


def tiny_llama_config(size: str = "tiny", vocab_size: int | None = None, **overrides: Any):
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    kwargs = dict(SIZES[size])
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    kwargs.setdefault("vocab_size", 128)
    kwargs.update(tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(size: str = "tiny", seed: int = 0, vocab_size: int | None = None, **overrides: Any):
    """A freshly initialised LlamaForCausalLM (fp32), identical for the same seed."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(size, vocab_size=vocab_size, **overrides))
