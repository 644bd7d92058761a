"""The regularizer core: options, registry, stack order, group merging, metrics, state."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from llmreg.core import (
    ConfigError,
    Order,
    Regularizer,
    RegularizerStack,
    build_regularizer,
    get_regularizer_class,
    option,
)
from llmreg.core.options import build_options, check_value
from llmreg.core.stack import assert_partition


def test_unknown_regularizer_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'l2_sp'"):
        get_regularizer_class("l2sp")


def test_unknown_option_suggests_closest_and_wrong_type_is_named():
    with pytest.raises(ConfigError, match="unknown key 'lamb'; did you mean 'lam'"):
        build_regularizer({"name": "l2_sp", "lamb": 1.0})
    with pytest.raises(ConfigError, match=r"l2_sp.lam: expected float, got 'big'"):
        build_regularizer({"name": "l2_sp", "lam": "big"})


def test_string_values_are_coerced_only_when_lossless():
    assert check_value("1e-5", float, "x") == 1e-5
    assert check_value("3", int, "x") == 3
    assert check_value("true", bool, "x") is True
    assert check_value(None, float | None, "x") is None
    with pytest.raises(ConfigError):
        check_value(1.5, int, "x")
    with pytest.raises(ConfigError):
        check_value(True, float, "x")


def test_build_from_name_dict_and_instance():
    from llmreg.regularizers import L2SP

    assert isinstance(build_regularizer("l2_sp"), L2SP)
    reg = build_regularizer({"name": "l2_sp", "lam": 0.5})
    assert reg.options.lam == 0.5
    assert build_regularizer(reg) is reg


class _Recorder(Regularizer):
    calls: list[str] = []

    def __init__(self, tag, order, **kw):
        super().__init__(**kw)
        self.tag, self.order = tag, order

    def setup(self, model, trainer):
        self.calls.append(self.tag)


def test_stack_runs_in_documented_order_stably():
    _Recorder.calls = []
    stack = RegularizerStack(
        [
            _Recorder("edit", Order.GRADIENT_EDIT),
            _Recorder("objective_a", Order.OBJECTIVE),
            _Recorder("surgery", Order.SURGERY),
            _Recorder("objective_b", Order.OBJECTIVE),
            _Recorder("freeze", Order.FREEZE),
        ]
    )
    stack.call("setup", None, None)
    assert _Recorder.calls == ["surgery", "freeze", "objective_a", "objective_b", "edit"]


@dataclass
class _GroupOpts:
    names: list[str] = option([], "names")
    wd: float = option(0.0, "wd")
    lr: float | None = option(None, "lr")


class _Groups(Regularizer):
    options_cls = _GroupOpts

    def param_groups(self, named_params):
        group = {"names": list(self.options.names), "weight_decay": self.options.wd}
        if self.options.lr is not None:
            group["lr"] = self.options.lr
        return [group]


def _named():
    return [(n, torch.nn.Parameter(torch.zeros(2))) for n in ("a", "b", "c")]


def test_group_merge_partitions_and_overrides_defaults():
    named = _named()
    defaults = {n: {"weight_decay": 0.01} for n, _ in named}
    stack = RegularizerStack([_Groups(names=["a"], wd=0.5), _Groups(names=["b"], wd=0.0, lr=1e-3)])
    groups = stack.optimizer_groups(named, defaults)
    by_names = {tuple(g["names"]): g for g in groups}
    assert by_names[("a",)]["weight_decay"] == 0.5
    assert by_names[("b",)]["weight_decay"] == 0.0 and by_names[("b",)]["lr"] == 1e-3
    assert by_names[("c",)]["weight_decay"] == 0.01 and "lr" not in by_names[("c",)]
    assert_partition(groups, named)


def test_group_conflict_between_regularizers_is_an_error():
    named = _named()
    stack = RegularizerStack([_Groups(names=["a"], wd=0.5), _Groups(names=["a"], wd=0.1)])
    with pytest.raises(ConfigError, match="cannot be combined"):
        stack.optimizer_groups(named, {n: {"weight_decay": 0.0} for n, _ in named})


def test_assert_partition_catches_missing_and_duplicates():
    named = _named()
    a, b, c = (p for _, p in named)
    with pytest.raises(AssertionError, match="in none"):
        assert_partition([{"params": [a, b]}], named)
    with pytest.raises(AssertionError, match="in two groups"):
        assert_partition([{"params": [a, b, c]}, {"params": [a]}], named)


def test_no_groups_means_parent_grouping():
    named = _named()
    assert RegularizerStack(["l2_sp"]).optimizer_groups(named, {n: {} for n, _ in named}) is None


def test_duplicate_names_get_distinct_metric_labels_and_state_round_trips():
    stack = RegularizerStack([{"name": "l2_sp", "lam": 1.0}, {"name": "l2_sp", "lam": 2.0}])
    assert stack.labels == ["l2_sp_0", "l2_sp_1"]
    stack.regularizers[0].anchors = {"w": torch.ones(3)}
    state = stack.state_dict()
    other = RegularizerStack([{"name": "l2_sp", "lam": 1.0}, {"name": "l2_sp", "lam": 2.0}])
    other.load_state_dict(state)
    assert torch.equal(other.regularizers[0].anchors["w"], torch.ones(3))
    with pytest.raises(ValueError, match="does not match"):
        RegularizerStack(["l2_sp"]).load_state_dict(state)


def test_trainer_kind_requirement_is_checked_up_front():
    from llmreg.core import Requirements

    class OnlyGRPO(Regularizer):
        requires = Requirements(trainers=("grpo",))

    with pytest.raises(ConfigError, match="does not support trainer kind 'sft'"):
        RegularizerStack([OnlyGRPO()], trainer_kind="sft")


def test_options_dataclass_errors_are_config_errors():
    with pytest.raises(ConfigError, match="where: unknown key"):
        build_options(_GroupOpts, {"nmes": []}, where="where")


def test_running_mean_averages_floats_and_tensors_per_key_and_resets():
    from llmreg.core.running_mean import RunningMean

    means = RunningMean()
    assert not means and means.pop() == {}
    means.add(a=1.0, b=torch.tensor(2.0))
    means.add(a=3.0)
    means.add(b=torch.tensor(4.0, requires_grad=True) * 1)
    assert means.pop() == {"a": 2.0, "b": 3.0}
    assert means.pop() == {}


def test_anatomy_finds_layers_and_indices_of_a_tiny_llama():
    from llmreg.core import anatomy
    from llmreg.data import tiny_llama

    model = tiny_llama(vocab_size=40)
    names = [n for n, _ in anatomy.decoder_layers(model)]
    assert names == ["model.layers.0", "model.layers.1"]
    assert anatomy.layer_list(anatomy.decoder(model)) == [m for _, m in anatomy.decoder_layers(model)]
    assert anatomy.layer_index("model.layers.1.mlp.up_proj.weight") == 1
    assert anatomy.layer_index("transformer.h.12.attn.c_attn.weight") == 12
    assert anatomy.layer_index("model.embed_tokens.weight") is None and anatomy.layer_key("lm_head.weight") == "other"
    assert (
        anatomy.base_name("base_model.model.model.layers.0.q_proj.base_layer.weight") == "model.layers.0.q_proj.weight"
    )
    assert not anatomy.is_peft(model) and anatomy.unwrap(model) is model
    batch = {"labels": torch.tensor([[-100, 5, 6, -100]])}
    assert anatomy.label_token_count(batch) == 2.0  # shifted: positions 1..3, two trained
