"""`llmreg export RUN_DIR OUT_DIR`: fold learnable multipliers into plain weights.

A run trained with the `multipliers` regularizer saves the wrapped weights (W plus lrm_row / lrm_col /
lrm_scalar next to it). Stock transformers would drop the multipliers with a warning and load a different
model, so this writes W_merged = (s r)[:, None] * W * c[None, :] (per-token rows and per-feature columns
for the embedding) into a model of the same config that loads without llmreg. Which layer carries which
multiplier is read from the saved names alone, so no recipe is needed.

Tied embeddings: when the input embedding or the LM head of a tied model carries multipliers, the two
matrices differ after merging; the export writes a separate LM head (`tie_word_embeddings=False`).

Verification: the wrapped model (rebuilt from the same files) and the exported one run a fixed batch;
the largest logit difference, relative to the largest logit, must stay below 1e-4 (fp32 weights) or
2e-2 (16-bit weights, where merging rounds once more).

Under ZeRO-3 export the gathered `final/` folder (`trainer.save_model` gathers it), or a folder written
by DeepSpeed's `zero_to_fp32`; partitioned checkpoint shards are not read here.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import shutil
from dataclasses import dataclass

import torch

import llmreg.regularizers.multipliers.surgery as surgery
from llmreg.core.options import ConfigError

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
NOT_COPIED = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
    "scaler.pt",
}
REPORT = "llmreg_export.json"

# the notes a wrapped model's config.json carries (written by the `multipliers` regularizer at setup, dropped by
# export_plain): CONFIG_NOTE says what was wrapped (placement, parameters); UNEXPORTED_KEY is the generic
# marker by which the recipe layer and `llmreg eval` refuse the folder with UNEXPORTED_NOTE
# (llmreg.recipe.models.refuse_unexported: "<where>: <folder> <note>", {path} standing for the folder)
CONFIG_NOTE = "llmreg_multipliers"
UNEXPORTED_KEY = "llmreg_unexported"
UNEXPORTED_NOTE = (
    "holds learnable multipliers (lrm_*) that transformers would drop; fold them into the weights "
    "first: llmreg export {path} <OUT_DIR>, and use <OUT_DIR>"
)


@dataclass
class ExportResult:
    source: str
    out_dir: str
    layers: int
    untied: bool
    max_abs_logit_diff: float | None
    rel_logit_diff: float | None


def model_folder(run_dir: str) -> str:
    """`RUN_DIR/final` of a run, or RUN_DIR itself when it is a model folder (a checkpoint, final/)."""
    for candidate in (os.path.join(run_dir, "final"), run_dir):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise ConfigError(f"export: {run_dir} is neither a run directory with final/ nor a model folder (no config.json)")


def mark_unexported(config) -> None:
    """Mark a wrapped model's config so that recipes and `llmreg eval` refuse its saved folder until exported."""
    setattr(config, UNEXPORTED_KEY, UNEXPORTED_NOTE)


def load_state(folder: str) -> dict[str, torch.Tensor]:
    files = sorted(f for pat in WEIGHT_FILES for f in glob.glob(os.path.join(folder, pat)))
    if not files:
        raise ConfigError(f"export: no model weights (*.safetensors, pytorch_model*.bin) in {folder}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state.update(load_file(path))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def _model_class(config):
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ConfigError(f"export: cannot build architecture {arch!r} with transformers")
    return cls


def _build(config, dtype: torch.dtype, plan: dict | None = None) -> torch.nn.Module:
    model = _model_class(config)(config).to(dtype)
    if plan:
        surgery.attach(model, plan)  # the default forward, as in training
    return model.eval()


def _embedding_keys(config) -> tuple[str, str | None]:
    """Names of the input-embedding and LM-head weights, read from a throwaway meta-device model."""
    with torch.device("meta"):
        model = _model_class(config)(config)
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings()
    head_key = f"{names[id(head)]}.weight" if head is not None else None
    return f"{names[id(model.get_input_embeddings())]}.weight", head_key


def _is_tied(config) -> bool:
    getter = getattr(config, "get_text_config", None)
    text = getter() if getter else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def _plain_config(src: str, untie: bool):
    """The config of the plain model: without the wrapped-model notes, untied when the export unties."""
    from transformers import AutoConfig

    plain_config = AutoConfig.from_pretrained(src)
    for note in (CONFIG_NOTE, UNEXPORTED_KEY):
        if hasattr(plain_config, note):
            delattr(plain_config, note)
    if untie:
        plain_config.tie_word_embeddings = False
        getter = getattr(plain_config, "get_text_config", None)
        if getter is not None and getter() is not plain_config:
            getter().tie_word_embeddings = False
    return plain_config


def export_plain(run_dir: str, out_dir: str, *, verify: bool = True, overwrite: bool = False) -> ExportResult:
    """Write the plain model of `run_dir` (see the module docstring) to `out_dir`."""
    from transformers import AutoConfig

    src = model_folder(run_dir)
    if os.path.abspath(src) == os.path.abspath(out_dir):
        raise ConfigError("export: OUT_DIR must differ from the model folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConfigError(f"export: {out_dir} is not empty; pass --overwrite to replace it")
    state = load_state(src)
    plan = surgery.plan_from_state_dict(state)
    if not plan:
        raise ConfigError(f"export: {src} holds no multipliers (lrm_*): it is a plain model already")
    config = AutoConfig.from_pretrained(src)
    embed_key, head_key = _embedding_keys(config)
    tied = _is_tied(config)
    if tied and head_key is not None and head_key not in state and embed_key in state:
        state[head_key] = state[embed_key]  # save_pretrained drops the tied copy
    dtype = state[embed_key].dtype if embed_key in state else next(iter(state.values())).dtype
    merged = surgery.merge_state_dict(state, plan)
    untie = tied and head_key is not None and any(k.rsplit(".", 1)[0] in plan for k in (embed_key, head_key))

    plain = _build(_plain_config(src, untie), dtype)
    plain.load_state_dict(merged, strict=True)  # tied and unmerged: both keys hold the same E

    diff = rel = None
    if verify:
        wrapped = _build(config, dtype, plan)
        wrapped.load_state_dict(state, strict=True)
        vocab = state[embed_key].shape[0]
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
        before, after = _logits(wrapped, ids), _logits(plain, ids)
        diff = (before - after).abs().max().item()
        rel = diff / before.abs().max().clamp_min(1e-12).item()
        limit = 1e-4 if dtype == torch.float32 else 2e-2
        if not rel <= limit:
            raise RuntimeError(
                f"export: merged model differs from the wrapped one (max |dlogit| {diff:.3g}, "
                f"relative {rel:.3g} > {limit})"
            )
    if os.path.isdir(out_dir) and overwrite:
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    plain.save_pretrained(out_dir)
    for path in glob.glob(os.path.join(src, "*")):
        name = os.path.basename(path)
        if (
            os.path.isfile(path)
            and name not in NOT_COPIED
            and not any(fnmatch.fnmatch(name, pat) for pat in (*WEIGHT_FILES, "rng_state*.pth"))
        ):
            shutil.copy2(path, os.path.join(out_dir, name))
    result = ExportResult(
        source=src, out_dir=out_dir, layers=len(plan), untied=untie, max_abs_logit_diff=diff, rel_logit_diff=rel
    )
    with open(os.path.join(out_dir, REPORT), "w") as f:
        json.dump({**vars(result), "multiplied_layers": sorted(plan)}, f, indent=1)
    return result
