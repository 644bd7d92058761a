"""Document hooks for the local lm-eval tasks (referenced as `!function llmreg_tasks.<name>`)."""


def drop_blank_lines(dataset):
    """The `text` loader gives one row per line; TinyStories paragraphs are single lines separated by blank
    ones (story boundaries are not recoverable), so one non-blank line = one document."""
    return dataset.filter(lambda doc: doc["text"].strip() != "")


# -- SmolLM2 chat tasks (issue 18): GSM8K scored under the chat template the SFT recipe trains with -----------------
# recipes/smollm2/gsm8k_sft.yaml trains on TRL's conversational prompt/completion rows, rendered by SmolLM2's own
# chat template, which adds its default system line when the conversation has none. The context below is that
# rendering (checked against tokenizer.apply_chat_template(..., add_generation_prompt=True) in
# tests/test_forgetting_real.py); the target is the assistant turn TRL puts the loss on, end marker included.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_END = "<|im_end|>"
DEV_ROWS = 200  # the calibration's dev split: the last 200 GSM8K train rows (the SFT recipe trains on the first 2000)
HELDOUT_LINES = 200  # tinystories_heldout_ppl: the last 200 paragraphs; replay data may use the first 2000


def smollm2_chat_context(doc):
    return (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}{CHAT_END}\n<|im_start|>user\n{doc['question']}{CHAT_END}\n"
        "<|im_start|>assistant\n"
    )


def chat_answer(doc):
    return doc["answer"] + CHAT_END


def answer_bits_per_byte(doc, results):
    """Per-document (loglik, bytes) pairs of the reference answer given the chat context: lm-eval's ratio
    aggregations turn them into bits per byte / byte perplexity of the answers (a tokenizer-independent NLL)."""
    loglik = results[0][0]
    pair = (loglik, len(chat_answer(doc).encode("utf-8")))
    return {"bits_per_byte": pair, "byte_perplexity": pair}


def last_dev_rows(dataset):
    return dataset.select(range(len(dataset) - DEV_ROWS, len(dataset)))


def heldout_paragraphs(dataset):
    """The last HELDOUT_LINES non-blank TinyStories lines (drop_blank_lines' documents)."""
    docs = drop_blank_lines(dataset)
    return docs.select(range(len(docs) - HELDOUT_LINES, len(docs)))
