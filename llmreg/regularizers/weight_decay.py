"""Per-pattern weight decay as optimizer parameter groups.

No paper of its own: the parameter-group policy used by "Pre-training under
infinite compute" (arXiv 2509.14786) and by most LLM codebases. By default
every trainable tensor with at least two dimensions decays, except embeddings;
biases and norm gains do not.

Hooks: `param_groups` only. The groups reach the HF optimizer and, with a
DeepSpeed config without an `optimizer` block, DeepSpeed's ZeRO optimizer.

Learnable multipliers (`lrm_*` parameters of the `multipliers` regularizer) are left to that regularizer's
own group, so the two combine.

Semantics: the value is handed to the trainer's optimizer. With the default
`adamw_torch` that is decoupled decay multiplied by the learning rate,
theta <- theta - lr * wd * theta (docs/architecture.md, trap 8), not L2 added to the loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llmreg.core.registry import register
from llmreg.core.regularizer import Order, Regularizer, option
from llmreg.regularizers.multipliers.surgery import is_multiplier

DEFAULT_NO_DECAY = [r"bias$", r"norm", r"embed", r"\bwte\b", r"\bwpe\b"]


def split_by_decay(
    named_params: list[tuple[str, torch.nn.Parameter]],
    decay_patterns: list[str],
    no_decay_patterns: list[str],
    min_ndim: int = 2,
) -> tuple[list[str], list[str]]:
    """(decayed names, not decayed names). A name in `decay_patterns` always decays; otherwise a tensor
    decays when it has at least `min_ndim` dimensions and matches no `no_decay_patterns`."""
    decay, no_decay = [], []
    for name, p in named_params:
        forced = any(re.search(pat, name) for pat in decay_patterns)
        excluded = any(re.search(pat, name) for pat in no_decay_patterns)
        (decay if forced or (p.ndim >= min_ndim and not excluded) else no_decay).append(name)
    return decay, no_decay


@dataclass
class WeightDecayOptions:
    weight_decay: float | None = option(
        None, "decay of the decayed group; None takes the trainer's weight_decay", ge=0, warn_above=10
    )
    decay: list[str] = option([], "regexes of parameter names that always decay (checked first)")
    no_decay: list[str] = option(list(DEFAULT_NO_DECAY), "regexes of parameter names that never decay")
    min_ndim: int = option(2, "tensors with fewer dimensions (biases, norm gains) do not decay", ge=0)


@register("weight_decay")
class WeightDecayPolicy(Regularizer):
    """Weight-decay parameter groups by pattern: 2-D weights decay; norms, biases and embeddings do not.

    Example::

        RegSFTTrainer(..., regularizers=[{"name": "weight_decay", "weight_decay": 0.1}])

    In a recipe: ``regularizers: [{name: weight_decay, weight_decay: 0.1}]``.
    """

    options_cls = WeightDecayOptions
    order = Order.PARAM_GROUPS

    def setup(self, model, trainer) -> None:
        self._default_wd = float(getattr(getattr(trainer, "args", None), "weight_decay", 0.0) or 0.0)

    def param_groups(self, named_params):
        wd = self.options.weight_decay
        if wd is None:
            wd = getattr(self, "_default_wd", 0.0)
        named_params = [(n, p) for n, p in named_params if not is_multiplier(n)]
        decay, no_decay = split_by_decay(named_params, self.options.decay, self.options.no_decay, self.options.min_ndim)
        return [{"names": decay, "weight_decay": wd}, {"names": no_decay, "weight_decay": 0.0}]
