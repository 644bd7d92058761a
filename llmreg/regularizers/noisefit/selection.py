"""The forwards that choose NoiseFiT's noisy layers, before training (eval mode, no grad):

- v1: the SNR of every candidate layer on one seeded batch (`LayerProbe.snr`);
- v2: the KL / CE response of every candidate layer to every candidate noise scale (`LayerProbe.kl_response`),
  the sums `calibration.v2_policy` turns into layers and scales.

The regularizer all-reduces / broadcasts the results so that every rank holds rank 0's choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from llmreg.core.anatomy import final_hidden
from llmreg.regularizers.noisefit.calibration import symmetric_kl
from llmreg.regularizers.noisefit.host import model_inputs
from llmreg.regularizers.noisefit.loss import positions
from llmreg.regularizers.noisefit.noise import adaptive_noise, layer_snr, standard_normal


@dataclass
class LayerProbe:
    """The model pieces a selection forward uses, and the regularizer's options."""

    layers: list[tuple[str, torch.nn.Module]]  # every decoder layer, (name, module)
    body: torch.nn.Module  # the decoder body: its output is the final hidden state
    lm_head: torch.nn.Module
    forward_kwargs: dict[str, Any]
    options: Any  # NoiseFiTOptions

    def snr(self, model: torch.nn.Module, batch: dict[str, Any], candidates: list[int]) -> torch.Tensor:
        """v1: SNR of each candidate layer (in `candidates` order) on `batch`, on the CPU."""
        scores: dict[int, torch.Tensor] = {}
        opts = self.options

        def capture(index):
            def hook(module, args, output):
                h = output if torch.is_tensor(output) else output[0]
                scores[index] = layer_snr(h, opts.noise_std, opts.beta, opts.nf_clip, opts.snr_draws, opts.seed, index)

            return hook

        last = len(self.layers) - 1
        post_norm = opts.last_layer_post_norm and last in candidates
        handles = [
            self.layers[i][1].register_forward_hook(capture(i)) for i in candidates if not (post_norm and i == last)
        ]
        if post_norm:
            hook = capture(last)
            handles.append(self.body.register_forward_hook(lambda m, a, out: hook(m, a, final_hidden(out))))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(**model_inputs(batch), **self.forward_kwargs)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        return torch.stack([scores[i] for i in candidates]).cpu()

    def kl_response(
        self, model: torch.nn.Module, batches: list[dict[str, Any]], indices: list[int] | None, candidates: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
        """v2: (KL sums [candidates, factors], CE-increase sums, (batches, clean CE sum), hidden size) over
        `batches`, the probe noise of batch b keyed by `indices[b]` (its global number)."""
        opts = self.options
        hidden = self.lm_head.in_features if hasattr(self.lm_head, "in_features") else None
        factors = list(opts.scale_factors)
        kl = torch.zeros(len(candidates), len(factors), dtype=torch.float64)
        dce = torch.zeros_like(kl)
        counts = torch.zeros(2, dtype=torch.float64)  # (batches, clean CE sum)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for b, batch in zip(indices or range(len(batches)), batches):
                    pos = positions(batch["labels"], True)
                    clean_h = self.final_hidden(model, batch)
                    hidden = clean_h.shape[-1]
                    clean_lp, clean_ce = self.logprobs(clean_h, pos)
                    counts += torch.tensor([1.0, clean_ce])
                    for r, layer in enumerate(candidates):
                        for j, factor in enumerate(factors):
                            scale = factor / math.sqrt(hidden)
                            hook = self.layers[layer][1].register_forward_hook(self.noise_hook(scale, (b, layer, j)))
                            try:
                                noisy_lp, noisy_ce = self.logprobs(self.final_hidden(model, batch), pos)
                            finally:
                                hook.remove()
                            kl[r, j] += (
                                float(masked_mean(symmetric_kl(clean_lp, noisy_lp), pos.ce)) * opts.temperature**2
                            )
                            dce[r, j] += max(noisy_ce - clean_ce, 0.0)
        finally:
            model.train(was_training)
        return kl, dce, counts, hidden

    def final_hidden(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        captured: dict[str, torch.Tensor] = {}
        handle = self.body.register_forward_hook(lambda m, a, out: captured.__setitem__("h", final_hidden(out)))
        try:
            model(**model_inputs(batch), **self.forward_kwargs)
        finally:
            handle.remove()
        return captured["h"]

    def logprobs(self, hidden: torch.Tensor, pos: Any) -> tuple[torch.Tensor, float]:
        """Tempered log-probabilities at the loss positions, and the (untempered) token-mean CE there."""
        z = self.lm_head(hidden[pos.rows, pos.cols]).float()
        ce = (
            torch.nn.functional.cross_entropy(z[pos.ce], pos.target[pos.ce], reduction="mean")
            if pos.ce.any()
            else z.new_zeros(())
        )
        return torch.log_softmax(z / self.options.temperature, -1), float(ce)

    def noise_hook(self, scale: float, key: tuple):
        """A forward hook adding the v2 probe noise (keyed draws, detached scale) to a layer's output."""
        opts = self.options

        def hook(module, args, output):
            h = output if torch.is_tensor(output) else output[0]
            eps = standard_normal(h.shape, h.device, "probe", opts.seed, *key)
            noisy = adaptive_noise(h, eps, scale, opts.beta, opts.nf_clip, detach_scale=True)
            return noisy if torch.is_tensor(output) else (noisy, *output[1:])

        return hook


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)
