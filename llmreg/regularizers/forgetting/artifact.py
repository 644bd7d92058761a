"""The importance artifact that links the two phases: `importance.safetensors` + `importance.json`.

The tensors are the full (unsharded) fp32 importance Omega per regularised weight, keyed by base weight
name. The JSON says how they were made (method, model, data, steps, options) and fingerprints the model:
its architecture and the sum of squares of the regularised weights at the start and at the end of the
importance phase, so that fine-tuning can refuse an artifact recorded for another model, or a run that
starts from other weights than the anchor it claims.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

import torch

from llmreg.core.options import ConfigError

TENSORS_FILE = "importance.safetensors"
META_FILE = "importance.json"
FORMAT = "llmreg-importance/1"
# relative tolerance on the weights' sum of squares: far above fp32/bf16 rounding of a whole model,
# far below what even a few optimizer steps change
FINGERPRINT_RTOL = 1e-4
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "n_embd",
    "n_layer",
)


def architecture(model: torch.nn.Module) -> dict[str, Any]:
    """The config fields that decide the weights' shapes (of the base model under PEFT)."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = model.get_base_model().config
    if config is None:
        return {}
    return {k: getattr(config, k) for k in ARCH_KEYS if getattr(config, k, None) is not None}


def save_artifact(directory: str | os.PathLike, importance: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Write the artifact; `meta` must hold method, architecture, parameters' shapes and anchor sums of squares."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().float().contiguous().cpu() for name, t in importance.items()}
    save_file(tensors, os.path.join(directory, TENSORS_FILE))
    meta = {"format": FORMAT, **meta, "parameters": {n: list(t.shape) for n, t in tensors.items()}}
    with open(os.path.join(directory, META_FILE), "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
    return str(directory)


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The artifact's metadata; a clear error when the directory is not an artifact."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ConfigError(
            f"importance artifact not found: {directory} (looked for {os.path.abspath(directory)}; write one with "
            "`llmreg importance RECIPE`)"
        )
    missing = [f for f in (TENSORS_FILE, META_FILE) if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise ConfigError(f"{directory} is not an importance artifact: missing {', '.join(missing)}")
    with open(os.path.join(directory, META_FILE)) as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{directory}: artifact format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def check_against_model(
    meta: dict[str, Any], directory: str, arch: dict[str, Any], shapes: dict[str, tuple[int, ...]]
) -> None:
    """Refuse an artifact for another architecture, or one lacking or mis-shaping a regularised weight."""
    recorded = meta.get("architecture", {})
    differ = {k: (recorded[k], arch[k]) for k in recorded.keys() & arch.keys() if recorded[k] != arch[k]}
    if differ:
        detail = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(differ.items()))
        raise ConfigError(f"importance artifact {directory} was recorded for another model ({detail})")
    params = {n: tuple(s) for n, s in meta["parameters"].items()}
    missing = [n for n in shapes if n not in params]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(
            f"importance artifact {directory} has no importance for {', '.join(missing[:3])}{more}; "
            f"record it with the same targets, or narrow `targets`/`exclude`"
        )
    for name, shape in shapes.items():
        if params[name] != tuple(shape):
            raise ConfigError(
                f"importance artifact {directory}: {name} has shape {list(params[name])}, the model's is {list(shape)}"
            )


def check_anchor(meta: dict[str, Any], directory: str, sum_sq: float, names: Iterable[str], anchor: str) -> None:
    """The run must start from the weights it is pulled toward: the importance run's end or start.

    `sum_sq` is the sum of squares of the weights `names` now; the artifact keeps it per weight for the
    importance run's start and end weights.
    """
    names = list(names)
    sums = {k: sum(per[n] for n in names) for k, per in meta.get("anchor_sum_sq", {}).items()}
    which = {"phase1_end": "end", "pretrained": "start"}[anchor]
    if _close(sums.get(which), sum_sq):
        return
    other = "start" if which == "end" else "end"
    hint = ""
    if _close(sums.get(other), sum_sq):
        hint = (
            f"; it matches the importance run's {other} weights: set anchor="
            f"{'pretrained' if other == 'start' else 'phase1_end'} or start from the {which} weights"
        )
    elif which == "end" and meta.get("final_model"):
        hint = f"; start fine-tuning from {meta['final_model']}"
    raise ConfigError(
        f"the model being fine-tuned is not the anchor of importance artifact {directory} "
        f"(anchor={anchor}: weights' sum of squares {sum_sq:.8g}, artifact {sums.get(which)}){hint}"
    )


def _close(expected: float | None, got: float) -> bool:
    return expected is not None and math.isclose(expected, got, rel_tol=FINGERPRINT_RTOL)


def load_importance(directory: str, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The full importance tensors for `names` (read lazily, one tensor at a time)."""
    from safetensors import safe_open

    with safe_open(os.path.join(directory, TENSORS_FILE), framework="pt") as fh:
        return {name: fh.get_tensor(name).float() for name in names}


def importance_stats(omega: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per-tensor sums of Omega^2 and of |Omega|, for the artifact's metadata: they give a_l's layer norms and
    the divisors of importance_scale rms / mean on every rank without reading the tensors."""
    return {
        "importance_sum_sq": {n: float(t.double().pow(2).sum()) for n, t in omega.items()},
        "importance_sum_abs": {n: float(t.double().abs().sum()) for n, t in omega.items()},
    }


def random_artifact(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    method: str = "si",
    seed: int = 0,
    scale: float = 1.0,
    layer_scale: dict[str, float] | None = None,
) -> str:
    """For tests and benchmarks: an artifact for `model` as it is now (its weights are both anchors) with
    random Omega in [0, scale) on the default targets, times `layer_scale[layer]` per decoder layer."""
    from llmreg.regularizers.forgetting.targets import default_selector, layer_of, select_parameters

    named = dict(model.named_parameters())
    names = select_parameters(named.items(), default_selector([], []))
    gen = torch.Generator().manual_seed(seed)
    layer_scale = layer_scale or {}
    omega = {n: scale * layer_scale.get(layer_of(n), 1.0) * torch.rand(named[n].shape, generator=gen) for n in names}
    sum_sq = {n: float(named[n].detach().double().pow(2).sum()) for n in names}
    return save_artifact(
        directory,
        omega,
        {
            "method": method,
            "architecture": architecture(model),
            "steps": 0,
            "model": "random (test/benchmark)",
            "anchor_sum_sq": {"start": sum_sq, "end": sum_sq},
            **importance_stats(omega),
        },
    )
