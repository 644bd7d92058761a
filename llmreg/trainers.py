"""The four drop-in trainers: `RegularizedTrainerMixin` + the parent (GRPO: plus `GRPOHooks`), nothing else.

Each takes its parent's arguments plus `regularizers=[...]` (objects, registered
names, or `{"name": ..., **options}` dicts).
"""

from __future__ import annotations

import transformers
import trl

from llmreg.integrations.hf import RegularizedTrainerMixin
from llmreg.integrations.trl import GRPOHooks


class RegTrainer(RegularizedTrainerMixin, transformers.Trainer):
    trainer_kind = "hf"


class RegSFTTrainer(RegularizedTrainerMixin, trl.SFTTrainer):
    trainer_kind = "sft"


class RegDPOTrainer(RegularizedTrainerMixin, trl.DPOTrainer):
    trainer_kind = "dpo"


class RegGRPOTrainer(GRPOHooks, RegularizedTrainerMixin, trl.GRPOTrainer):
    """`GRPOHooks` (llmreg.integrations.trl) adds GRPO's hook points: rollout hidden states, generation-batch
    tensors and the per-token log-probs of each micro-batch; it delegates straight to TRL with an empty stack."""

    trainer_kind = "grpo"


TRAINERS = {"hf": RegTrainer, "sft": RegSFTTrainer, "dpo": RegDPOTrainer, "grpo": RegGRPOTrainer}
