"""llmreg: paper-faithful regularizers for LLM training, as drop-in HF/TRL trainers."""

from llmreg import regularizers
from llmreg.core import (
    ConfigError,
    LossContext,
    Order,
    Regularizer,
    RegularizerStack,
    Requirements,
    available,
    build_regularizer,
    get_regularizer_class,
    register,
)

__version__ = "0.1.0"

_TRAINERS = ("RegTrainer", "RegSFTTrainer", "RegDPOTrainer", "RegGRPOTrainer")


def __getattr__(name: str):
    # the trainers import TRL (seconds); commands like `llmreg list` do not need them
    if name in _TRAINERS:
        from llmreg import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module 'llmreg' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "LossContext",
    "Order",
    "Regularizer",
    "RegularizerStack",
    "Requirements",
    "available",
    "build_regularizer",
    "get_regularizer_class",
    "register",
    "regularizers",
    *_TRAINERS,
]
