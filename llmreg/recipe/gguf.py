"""GGUF checkpoints: de-quantised once through transformers' own GGUF loader, then loaded as a plain model folder.

A recipe names one with `model: {name_or_path: DIR, gguf_file: NAME.gguf}` (or `name_or_path: DIR/NAME.gguf`),
`tokenizer:` likewise; `llmreg eval --model/--base DIR/NAME.gguf` takes the file's path. Loading needs the
`gguf` package (`pip install 'llmreg[gguf]'`); validation refuses a missing package or file in one line.

De-quantising every tensor takes ~40 s for a 135M model on two cores, so the result is written once, as fp32
safetensors with the tokenizer beside them, into `<cache>/<sha256 of the file's bytes>/`, where `<cache>` is
`$LLMREG_GGUF_CACHE`, else `~/.cache/llmreg/gguf`. The next load (any run, any rank) reads that folder in seconds.
Keying by content, not by path, means a replaced file is converted again and a copied one is not.

transformers marks a model loaded from a GGUF as quantised and refuses `save_pretrained` on it, though its
weights are ordinary float tensors: the model is rebuilt from its config without `quantization_config`, and the
state dict loaded into it (strict), before it is saved; a model loaded from the cache is an ordinary model, so
training, checkpoints and `final/` work as for any other. Under DeepSpeed the recipe converts on the main
process first (`args.main_process_first`) and the other ranks load the cache it wrote; the conversion builds whole
models outside `zero.Init` (integrations.hf_access.zero3_init_off), whose collectives would wait for the others.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile

from llmreg.core.options import ConfigError

CACHE_ENV = "LLMREG_GGUF_CACHE"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "llmreg", "gguf")
SUFFIX = ".gguf"
# written last into a cache folder, one per part, so a conversion cut short is redone
DONE = {"model": ".llmreg-model-done", "tokenizer": ".llmreg-tokenizer-done"}
MODEL_PARTS = ("model", "tokenizer")  # a model's cache folder is a whole model folder, tokenizer included
_HASHES: dict[tuple, str] = {}


def is_gguf_path(path: str | None) -> bool:
    return bool(path) and str(path).lower().endswith(SUFFIX)


def split_gguf_path(path: str) -> tuple[str, str]:
    """`DIR/NAME.gguf` -> (DIR, NAME.gguf), as `from_pretrained(DIR, gguf_file=NAME.gguf)` takes them."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    return os.path.dirname(path), os.path.basename(path)


def check_gguf(folder: str, gguf_file: str, where: str) -> str:
    """The file's absolute path; a one-line ConfigError when the `gguf` package or the file is missing."""
    path = os.path.abspath(os.path.join(os.path.expanduser(str(folder)), gguf_file))
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"{where}: loading {os.path.basename(path)} needs the gguf package: pip install 'llmreg[gguf]'"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: GGUF file not found: {path}")
    return path


def cache_root() -> str:
    return os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def content_hash(path: str) -> str:
    """sha256 of the file's bytes (remembered per path, size and mtime within a process)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def cache_folder(path: str) -> str:
    return os.path.join(cache_root(), content_hash(path))


def is_cached(path: str, parts: tuple[str, ...] = MODEL_PARTS) -> bool:
    folder = cache_folder(path)
    return all(os.path.isfile(os.path.join(folder, DONE[part])) for part in parts)


def converted_folder(folder: str, gguf_file: str, parts: tuple[str, ...] = MODEL_PARTS) -> str:
    """The cache folder holding `parts` of the GGUF `folder/gguf_file` as a plain HF model folder; converts
    the parts not there yet. Call it on one process first (the recipe does) so ranks do not convert in turn."""
    path = check_gguf(folder, gguf_file, "gguf")
    out = cache_folder(path)
    for part in parts:
        if os.path.isfile(os.path.join(out, DONE[part])):
            continue
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{part}-", dir=out) as tmp:
            (_write_model if part == "model" else _write_tokenizer)(path, tmp)
            for name in os.listdir(tmp):  # each file replaced whole; the marker last
                os.replace(os.path.join(tmp, name), os.path.join(out, name))
        with open(os.path.join(out, DONE[part]), "w") as f:
            f.write(path + "\n")
    return out


def dequantise(path: str):
    """transformers' GGUF loader: every tensor de-quantised to fp32 (the slow step the cache saves)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = split_gguf_path(path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def plain_copy(model):
    """The same weights in a model built from its config without `quantization_config`, which transformers lets
    save (it refuses a model it marked as GGUF-quantised)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain


def _write_model(path: str, out: str) -> None:
    from llmreg.integrations.hf_access import zero3_init_off

    print(f"de-quantising {path} once into the GGUF cache {cache_root()} ...", flush=True)
    with zero3_init_off():  # one rank converts while the others wait: no collective zero.Init
        plain_copy(dequantise(path)).save_pretrained(out)


def _write_tokenizer(path: str, out: str) -> None:
    from transformers import AutoTokenizer

    folder, name = split_gguf_path(path)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def resolve_gguf_spec(spec, where: str) -> None:
    """Validation of `model:` / `tokenizer:` (ModelSpec, TokenizerSpec): `name_or_path: DIR/NAME.gguf` becomes
    the folder and `gguf_file`; a `gguf_file` needs the folder, the file and the gguf package."""
    if spec.gguf_file is None and is_gguf_path(spec.name_or_path):
        spec.name_or_path, spec.gguf_file = split_gguf_path(spec.name_or_path)
    if spec.gguf_file is None:
        return
    if spec.name_or_path is None:
        raise ConfigError(f"{where}.gguf_file: set {where}.name_or_path to the folder that holds {spec.gguf_file}")
    check_gguf(spec.name_or_path, spec.gguf_file, f"{where}.gguf_file")


def gguf_model_folder(path: str) -> str:
    """`DIR/NAME.gguf` -> its converted model folder (model and tokenizer); any other path unchanged."""
    return converted_folder(*split_gguf_path(path)) if is_gguf_path(path) else path
