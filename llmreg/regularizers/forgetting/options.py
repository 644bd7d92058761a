"""forgetting_penalty's options and the settings it runs on (PenaltyConfig, which presets such as l2_sp fill in
with their own options); the penalty itself is in llmreg.regularizers.forgetting.penalty."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmreg.core.regularizer import option
from llmreg.regularizers.forgetting.targets import Selector

DEFAULT_LAMBDA = {"si": 1e-3, "ewc": 0.5, "l2sp": 0.005}


@dataclass
class ForgettingPenaltyOptions:
    importance: Literal["si", "ewc", "l2sp"] = option(
        "si", "si | ewc: Omega from `artifact`; l2sp: Omega = 1 (no artifact)"
    )
    artifact: str | None = option(None, "directory written by `llmreg importance` (importance.safetensors + .json)")
    lam: float | None = option(
        None,
        "penalty weight lambda; default by importance: si 1e-3 (paper and code), "
        "ewc 0.5 (the code's EWC baseline), l2sp 0.005 (= l2_sp's lam 0.01 / 2)",
        ge=0,
        warn_above=1e6,
    )
    layer_weighting: Literal["softmax", "uniform", "none"] | None = option(
        None,
        "a_l: softmax(c*||Omega_l||) (paper) | uniform 1/L | none (a_l = 1); default softmax for si, "
        "none for ewc and l2sp",
    )
    layer_temperature: float = option(
        1e-8, "c inside the layer softmax (code: 1e-8); retune when a_l is one-hot or flat", ge=0
    )
    importance_scale: Literal["raw", "rms", "mean"] = option(
        "raw",
        "raw: Omega as the artifact holds it (paper) | mean: Omega divided by its mean |Omega| over the covered "
        "weights, so lam pulls the average weight as l2_sp's lam / 2 on every model and for si and ewc | rms: "
        "divided by its root mean square (dominated by the largest entries when Omega is heavy-tailed, as a "
        "Fisher is); the lam and c defaults are the paper's for raw Omega: set both with mean or rms",
    )
    targets: list[str] = option(
        [], "regexes of weight names to regularise; default: the 2-D weights of the decoder layers"
    )
    exclude: list[str] = option([], "regexes of weight names left out")
    anchor: Literal["phase1_end", "pretrained"] = option(
        "phase1_end",
        "which weights of the importance run this run starts from and is pulled toward: "
        "phase1_end (the paper) | pretrained",
    )
    apply: Literal["grad_edit", "loss"] = option(
        "grad_edit", "grad_edit: edit local gradient shards once per step | loss: add R to the loss (no DeepSpeed)"
    )


@dataclass(frozen=True)
class PenaltyConfig:
    """The settings the implementation runs on; presets (l2_sp) map their own options onto it."""

    importance: str
    lam: float
    weighting: str
    temperature: float
    selector: Selector
    anchor: str | None
    apply: str
    artifact: str | None
    importance_scale: str = "raw"
