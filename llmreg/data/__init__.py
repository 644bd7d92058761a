"""Built-in data, tokenizer and tiny models: everything a run needs without a download."""

from llmreg.data.builtin import BUILTIN_TASKS, make_builtin_dataset
from llmreg.data.tiny import tiny_llama, tiny_llama_config
from llmreg.data.tokenizer import build_char_tokenizer

__all__ = ["BUILTIN_TASKS", "build_char_tokenizer", "make_builtin_dataset", "tiny_llama", "tiny_llama_config"]
