"""Built-in regularizers, one module per method. Importing this package registers them all."""

from llmreg.regularizers.forgetting import ForgettingPenalty, SIImportance
from llmreg.regularizers.half_ft import HalfFineTuning
from llmreg.regularizers.l2_sp import L2SP, l2_sp_grad, l2_sp_penalty
from llmreg.regularizers.noisefit import NoiseFiT
from llmreg.regularizers.weight_decay import WeightDecayPolicy, split_by_decay

__all__ = ["ForgettingPenalty", "HalfFineTuning", "L2SP", "NoiseFiT", "SIImportance", "WeightDecayPolicy", "l2_sp_grad", "l2_sp_penalty", "split_by_decay"]
