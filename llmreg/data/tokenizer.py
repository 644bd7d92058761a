"""A character-level tokenizer built locally (no download), for tests and the quickstart.

Every printable ASCII character and newline is one token, plus <pad>, <s>,
</s> and <unk>. It is a real `PreTrainedTokenizerFast`, so TRL and lm-eval use
it like any hub tokenizer, and `save_pretrained` writes it next to a model.
"""

from __future__ import annotations

import string

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = sorted(set(string.printable) - set("\r\x0b\x0c"))


def build_char_tokenizer(model_max_length: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )
