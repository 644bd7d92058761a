"""llmreg: paper-faithful regularizers for LLM training, as drop-in HF/TRL trainers."""

from llmreg.core import (
    ConfigError, LossContext, Order, Regularizer, RegularizerStack, Requirements, available, build_regularizer,
    get_regularizer_class, register,
)
from llmreg import regularizers
from llmreg.trainers import RegDPOTrainer, RegGRPOTrainer, RegSFTTrainer, RegTrainer

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "LossContext", "Order", "RegDPOTrainer", "RegGRPOTrainer", "RegSFTTrainer", "RegTrainer",
    "Regularizer", "RegularizerStack", "Requirements", "available", "build_regularizer", "get_regularizer_class",
    "register", "regularizers",
]
