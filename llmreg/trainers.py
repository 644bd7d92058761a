"""The four drop-in trainers: `RegularizedTrainerMixin` + the parent, nothing else.

Each takes its parent's arguments plus `regularizers=[...]` (objects, registered
names, or `{"name": ..., **options}` dicts).
"""

from __future__ import annotations

import transformers
import trl

from llmreg.core.trainer_mixin import RegularizedTrainerMixin


class RegTrainer(RegularizedTrainerMixin, transformers.Trainer):
    trainer_kind = "hf"


class RegSFTTrainer(RegularizedTrainerMixin, trl.SFTTrainer):
    trainer_kind = "sft"


class RegDPOTrainer(RegularizedTrainerMixin, trl.DPOTrainer):
    trainer_kind = "dpo"


class RegGRPOTrainer(RegularizedTrainerMixin, trl.GRPOTrainer):
    trainer_kind = "grpo"


TRAINERS = {"hf": RegTrainer, "sft": RegSFTTrainer, "dpo": RegDPOTrainer, "grpo": RegGRPOTrainer}
