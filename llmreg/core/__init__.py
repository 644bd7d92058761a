"""The regularizer core: base class, registry, stack, local shards, DeepSpeed shim, trainer mixin."""

from llmreg.core.options import ConfigError
from llmreg.core.registry import available, build_regularizer, get_regularizer_class, register
from llmreg.core.regularizer import LossContext, NoOptions, Order, Regularizer, Requirements, option
from llmreg.core.shards import ShardAccess
from llmreg.core.stack import RegularizerStack

__all__ = [
    "ConfigError",
    "LossContext",
    "NoOptions",
    "Order",
    "Regularizer",
    "RegularizerStack",
    "Requirements",
    "ShardAccess",
    "available",
    "build_regularizer",
    "get_regularizer_class",
    "option",
    "register",
]
