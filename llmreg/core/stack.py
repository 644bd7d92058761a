"""Several regularizers run as one.

Order: the stack sorts its regularizers by `Regularizer.order` (surgery,
freezing, parameter groups, objectives, gradient edits; see `Order`), keeping
the user's order among equals, and calls every hook in that order.

Parameter groups: every trainable parameter starts from the host trainer's
default (its weight decay on the parameters the Trainer decays, 0 elsewhere,
and the trainer's learning rate). Each regularizer's groups then override
options for the parameters they name. Two regularizers that set the same
option of the same parameter to different values are an error. Parameters with
identical resulting options share one optimizer group, and the stack asserts
the groups partition the trainable parameters exactly.

Loss terms: `scaled_loss_terms` returns the sum of the terms of one micro-batch
in the host loss's units; see `ga_divisor`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch

from llmreg.core.options import ConfigError
from llmreg.core.registry import build_regularizer
from llmreg.core.regularizer import TRAINER_KINDS, LossContext, Regularizer


class RegularizerStack:
    def __init__(self, regularizers: Iterable[Any] = (), trainer_kind: str = "hf") -> None:
        if trainer_kind not in TRAINER_KINDS:
            raise ValueError(f"trainer kind must be one of {TRAINER_KINDS}, got {trainer_kind!r}")
        regs = [build_regularizer(spec) for spec in (regularizers or [])]
        self.regularizers: list[Regularizer] = sorted(regs, key=lambda r: r.order)  # sorted() is stable
        self.trainer_kind = trainer_kind
        self.labels = _unique_labels(self.regularizers)
        self._check_trainer_kind()
        self.loss_owner = self._find_loss_owner()
        self._term_sums: dict[str, dict[str, float]] = {}
        self._term_counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.regularizers)

    def __iter__(self):
        return iter(self.regularizers)

    def any_overrides(self, hook: str) -> bool:
        return any(r.overrides(hook) for r in self.regularizers)

    # -- validation --------------------------------------------------------------------
    def _check_trainer_kind(self) -> None:
        for reg in self.regularizers:
            if self.trainer_kind not in reg.requires.trainers:
                raise ConfigError(
                    f"regularizer '{reg.name}' does not support trainer kind '{self.trainer_kind}' "
                    f"(supported: {', '.join(reg.requires.trainers)})"
                )

    def _find_loss_owner(self) -> Regularizer | None:
        """The one regularizer that replaces the host's training loss, if any."""
        owners = [r for r in self.regularizers if r.overrides("training_loss")]
        if len(owners) > 1:
            raise ConfigError(
                f"regularizers {', '.join(repr(r.name) for r in owners)} each replace the training "
                "loss; at most one of them can be used at a time"
            )
        if owners and any(r.requires.needs_outputs for r in self.regularizers):
            needs = [r.name for r in self.regularizers if r.requires.needs_outputs]
            raise ConfigError(
                f"regularizer '{owners[0].name}' replaces the host's forward and loss, so the model "
                f"outputs that {', '.join(needs)} need do not exist; they cannot be combined"
            )
        return owners[0] if owners else None

    def check_environment(self, *, zero_stage: int, is_peft: bool) -> None:
        for reg in self.regularizers:
            if zero_stage == 3 and not reg.requires.supports_zero3:
                raise ConfigError(f"regularizer '{reg.name}' does not support DeepSpeed ZeRO-3")
            if is_peft and not reg.requires.supports_peft:
                raise ConfigError(f"regularizer '{reg.name}' does not support PEFT models")

    @property
    def needs_outputs(self) -> bool:
        return any(r.requires.needs_outputs for r in self.regularizers)

    # -- hooks ---------------------------------------------------------------------------
    def call(self, hook: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `hook(*args, **kwargs)` on every regularizer that has it, in stack order; their results.

        This is the one dispatch path: a new hook is a method on `Regularizer` (or on a protocol class of an
        integration) and one `stack.call` at its call site."""
        results = []
        for reg in self.regularizers:
            method = getattr(reg, hook, None)
            if method is not None:
                results.append(method(*args, **kwargs))
        return results

    def pop_grad_norm(self) -> float | None:
        """The first gradient norm a regularizer computed in this step's `pre_step` (each is read once)."""
        return next((n for n in self.call("pop_grad_norm") if n is not None), None)

    def loss_terms(self, ctx: LossContext) -> torch.Tensor | None:
        """Sum of every regularizer's terms for this micro-batch (unscaled), or None."""
        total = None
        for reg, label in zip(self.regularizers, self.labels):
            for key, term in reg.loss_terms(ctx).items():
                value = float(term.detach())
                sums = self._term_sums.setdefault(label, {})
                sums[key] = sums.get(key, 0.0) + value
                self._term_counts[f"{label}/{key}"] += 1
                total = term if total is None else total + term
        return total

    # -- parameter groups ----------------------------------------------------------------
    def optimizer_groups(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        default_options: dict[str, dict[str, Any]],
    ) -> list[dict[str, Any]] | None:
        """Merge the regularizers' groups into optimizer param groups, or None if none has any.

        `default_options[name]` holds the host trainer's options for each trainable parameter.
        """
        trainable = [(n, p) for n, p in named_params if p.requires_grad]
        by_name = dict(trainable)
        options = {n: dict(default_options[n]) for n, _ in trainable}
        set_by: dict[tuple[str, str], str] = {}
        any_groups = False
        for reg, label in zip(self.regularizers, self.labels):
            groups = reg.param_groups(trainable)
            if not groups:
                continue
            any_groups = True
            claimed: set[str] = set()
            for group in groups:
                names = list(group["names"])
                for name in names:
                    if name not in by_name:
                        raise ConfigError(
                            f"regularizer '{reg.name}' put unknown or frozen parameter '{name}' in a group"
                        )
                    if name in claimed:
                        raise ConfigError(f"regularizer '{reg.name}' put parameter '{name}' in two groups")
                    claimed.add(name)
                    for key, value in group.items():
                        if key == "names":
                            continue
                        previous = set_by.get((name, key))
                        if previous is not None and previous != label and options[name].get(key) != value:
                            raise ConfigError(
                                f"regularizers '{previous}' and '{label}' both set {key} of '{name}' "
                                f"({options[name][key]} vs {value}); they cannot be combined"
                            )
                        options[name][key] = value
                        set_by[(name, key)] = label
        if not any_groups:
            return None
        buckets: dict[tuple, list[str]] = {}
        for name, _ in trainable:
            key = tuple(sorted(options[name].items()))
            buckets.setdefault(key, []).append(name)
        result = [
            {"params": [by_name[n] for n in names], "names": names, **dict(key)} for key, names in buckets.items()
        ]
        assert_partition(result, trainable)
        return result

    # -- metrics and state ---------------------------------------------------------------
    def pop_metrics(self) -> dict[str, float]:
        """Metrics since the last call, as {"reg/<label>/<key>": value}; loss terms are averaged."""
        out: dict[str, float] = {}
        for label, sums in self._term_sums.items():
            for key, total in sums.items():
                out[f"reg/{label}/{key}"] = total / max(self._term_counts[f"{label}/{key}"], 1)
        self._term_sums.clear()
        self._term_counts.clear()
        for reg, label in zip(self.regularizers, self.labels):
            for key, value in reg.metrics().items():
                out[f"reg/{label}/{key}"] = float(value)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {label: reg.state_dict() for reg, label in zip(self.regularizers, self.labels)}

    def load_state_dict(self, state: dict[str, Any], early: bool | None = None) -> None:
        """Load every regularizer's state, or only those with `loads_state_early == early`."""
        missing = set(self.labels) - set(state)
        unexpected = set(state) - set(self.labels)
        if missing or unexpected:
            raise ValueError(
                f"regularizer state does not match the stack: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        for reg, label in zip(self.regularizers, self.labels):
            if early is None or reg.loads_state_early == early:
                reg.load_state_dict(state[label])


def assert_partition(groups: list[dict[str, Any]], trainable: list[tuple[str, torch.nn.Parameter]]) -> None:
    """Every trainable parameter is in exactly one group, and nothing else is."""
    seen: Counter[int] = Counter(id(p) for g in groups for p in g["params"])
    expected = {id(p) for _, p in trainable}
    twice = [n for n, p in trainable if seen[id(p)] > 1]
    missing = [n for n, p in trainable if seen[id(p)] == 0]
    extra = set(seen) - expected
    if twice or missing or extra:
        raise AssertionError(
            f"parameter groups do not partition the trainable parameters: in two groups {twice[:5]}, "
            f"in none {missing[:5]}, {len(extra)} not trainable"
        )


def _unique_labels(regs: list[Regularizer]) -> list[str]:
    counts = Counter(r.name for r in regs)
    seen: Counter[str] = Counter()
    labels = []
    for r in regs:
        if counts[r.name] == 1:
            labels.append(r.name)
        else:
            labels.append(f"{r.name}_{seen[r.name]}")
            seen[r.name] += 1
    return labels
