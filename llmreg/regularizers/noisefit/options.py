"""NoiseFiT's options (the spec's defaults; the code's variants as options: see the package docstring)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from llmreg.core.options import check_fields_in_range
from llmreg.core.regularizer import option


@dataclass
class NoiseFiTOptions:
    noise_std: float = option(0.1, "sigma: noise std relative to std(h) of the branch's hidden states", ge=0)
    num_layers: int = option(3, "k: number of decoder layers that get noise", ge=1)
    select: Literal["high", "low"] = option("high", "pick the k layers of highest (v1 'Largest') or lowest SNR")
    layers: str = option(
        "",
        "regex searched in the decoder-layer module names to restrict the candidates "
        "(e.g. 'layers\\.(2|3|4)$'); empty: every decoder layer",
    )
    beta: float = option(0.1, "beta: down-weighting of elements far from the token's median", ge=0)
    nf_clip: float = option(5.0, "cap on the variance factor nf", gt=0)
    snr_draws: int = option(10, "noise draws per layer for the SNR estimate", ge=1)
    last_layer_post_norm: bool = option(
        False,
        "v1 quirk: score the last decoder layer on the final-norm output "
        "(hidden_states[-1]) while its hook still sees the raw layer output",
    )
    calib_batch_size: int = option(0, "rows of the seeded SNR calibration batch; 0: per_device_train_batch_size", ge=0)
    alpha: float = option(
        0.5, "weight of the clean CE in the hybrid loss; (1 - alpha) weighs the soft term", ge=0, le=1
    )
    lam: float | None = option(
        None,
        "lambda: weight of the consistency KL(noisy 2 || noisy 1); None: 0.1 (v1), 0.05 (v2)",
        ge=0,
        warn_above=1e6,
    )
    temperature: float = option(1.0, "T: softmax temperature of the clean teacher", gt=0)
    double_sigma: bool = option(False, "v1 quirk: the training noise base is sigma^2 * std(h) (selection uses sigma)")
    shift_mask: bool = option(True, "False: v1 bug, the soft/consistency mask labels != -100 is one position off")
    detach_teacher: bool | None = option(
        None,
        "detach the teacher and the consistency target, temper all sides by T, soft term times T^2 (v2); "
        "None: False for v1, True for v2",
    )
    detach_noise_scale: bool | None = option(
        None, "add the noise as a detached offset, identity gradient through h (v2); None: False for v1, True for v2"
    )
    version: Literal["v1", "v2"] = option(
        "v1",
        "v1: SNR selection of k layers, noise base sigma*std(h); v2: KL-response calibration of the layers "
        "(at most ceil(sqrt(L))) and of a scale s_l per layer, noise base s_l (k, select, noise_std unused)",
    )
    calib_batches: int = option(2, "v2: calibration batches per rank (seeded draws), statistics all-reduced", ge=1)
    scale_factors: list[float] = option(
        [0.25, 0.5, 1.0, 1.5, 2.0], "v2: candidate scales, times 1/sqrt(hidden size)", gt=0
    )
    max_ce_ratio: float = option(0.02, "v2: reject scales whose relative CE increase exceeds this", ge=0)
    scale_prior: float = option(0.05, "v2: score divided by 1 + scale_prior * log2(factor)^2", ge=0)
    target_kl_frac: float = option(
        0.75, "v2: per-layer scale = smallest reaching this fraction of the median best KL", gt=0, le=1
    )
    depth_bands: int = option(3, "v2: spread the selected layers over this many depth bands (1: off)", ge=1)
    pack_branches: Literal["auto", "never"] = option(
        "auto",
        "auto: clean and both noisy branches stacked in one forward; never: three forwards of the batch (as "
        "the official code; lower peak per forward, same activations kept; not with gradient checkpointing)",
    )
    prefix_sharing: bool | None = option(
        None,
        "run the embeddings and the layers up to the first noisy layer once and stack the three branches only "
        "after it (identical values: those layers see the same input in every branch); None: on unless a "
        "module of that prefix has dropout (shared dropout masks would change the branches); only with "
        "pack_branches='auto'",
    )
    seed: int = option(0, "seed of the calibration batch and of every noise draw", ge=0)
    chunk_size: int = option(256, "positions per chunk of the chunked LM head / KL computation", ge=1)
    recompute_logits: Literal["auto", "always", "never"] = option(
        "auto",
        "recompute each chunk's logits in backward instead of keeping them for it; auto: when the three "
        "branches' fp32 logits at the loss positions would exceed 256 MiB (large vocabularies)",
    )

    def __post_init__(self) -> None:
        v2 = self.version == "v2"
        self.lam = (0.05 if v2 else 0.1) if self.lam is None else self.lam
        self.detach_teacher = v2 if self.detach_teacher is None else self.detach_teacher
        self.detach_noise_scale = v2 if self.detach_noise_scale is None else self.detach_noise_scale
        check_fields_in_range(self)  # the declared ranges, also when the options are built directly
        if not self.scale_factors or min(self.scale_factors) <= 0 or sorted(self.scale_factors) != self.scale_factors:
            raise ValueError(f"scale_factors must be positive and ascending, got {self.scale_factors}")
        try:
            re.compile(self.layers)
        except re.error as err:
            raise ValueError(f"layers is not a valid regex: {err}") from None
