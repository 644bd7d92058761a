"""Tiny random configs of the architecture families users fine-tune (issue 16): 2 decoder layers, hidden 64,
a vocabulary that covers the char tokenizer of `llmreg.data`. Built from config, nothing downloaded.

`FAMILIES` lists the model types; `tiny_model(model_type)` returns a float32 causal LM with fixed init seed.
`VARIANTS` are further names `tiny_model` takes: a family with some config keys changed ("llama_tied": Llama with
its LM head tied to the input embedding, as Gemma and small Qwen checkpoints ship).
"""

from __future__ import annotations

import torch

VOCAB = 128
HIDDEN = 64
LAYERS = 2

# per family, the keys its config names differently (GPT-2 / GPT-NeoX / Falcon) or needs (MoE, Gemma)
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
    head_dim=16,
)
_SPECIFIC = {
    "gpt2": dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128),
    "gpt_neox": dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    ),
    "falcon": dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        new_decoder_architecture=False,
        multi_query=True,
        parallel_attn=True,
        bias=False,
    ),
    "qwen3_moe": dict(_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "gemma2": dict(_COMMON, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(_COMMON, final_logit_softcapping=30.0, sliding_window=16),
    "granite": dict(_COMMON, logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5),
}
FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "gpt_neox",
    "falcon",
    "gpt2",
    "granite",
)
MOE_FAMILIES = ("qwen3_moe", "mixtral")
VARIANTS = {"llama_tied": ("llama", dict(tie_word_embeddings=True))}


def tiny_config(model_type: str):
    from transformers import AutoConfig

    model_type, changed = VARIANTS.get(model_type, (model_type, {}))
    kwargs = dict(_SPECIFIC.get(model_type, _COMMON), **changed)
    if model_type == "phi3":
        kwargs.pop("head_dim")
    kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the char tokenizer's ids
    config = AutoConfig.for_model(model_type, **kwargs)
    return config


def tiny_model(model_type: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).float()
