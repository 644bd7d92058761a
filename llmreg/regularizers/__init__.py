"""Built-in regularizers, one module per method. Importing this package registers them all."""

from llmreg.regularizers.forgetting import ForgettingPenalty, SIImportance
from llmreg.regularizers.half_ft import HalfFineTuning
from llmreg.regularizers.kl_to_base import KLToBase
from llmreg.regularizers.l2_sp import L2SP, l2_sp_grad, l2_sp_penalty
from llmreg.regularizers.lfu import LfU
from llmreg.regularizers.lp_reg import LpReg, lp_reg_penalty, minp_proxy_logprobs
from llmreg.regularizers.multipliers import LearnableMultipliers
from llmreg.regularizers.noisefit import NoiseFiT
from llmreg.regularizers.weight_decay import WeightDecayPolicy, split_by_decay

__all__ = [
    "ForgettingPenalty",
    "HalfFineTuning",
    "KLToBase",
    "L2SP",
    "LearnableMultipliers",
    "LfU",
    "LpReg",
    "NoiseFiT",
    "SIImportance",
    "WeightDecayPolicy",
    "l2_sp_grad",
    "l2_sp_penalty",
    "lp_reg_penalty",
    "minp_proxy_logprobs",
    "split_by_decay",
]
