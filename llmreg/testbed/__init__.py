"""The forgetting testbed: a small model pre-trained offline on synthetic skills, and a new skill to fine-tune on.

from llmreg import testbed
path = testbed.build()                      # cached under ~/.cache/llmreg/testbed/<hash>
model = testbed.finetune(path, "sub")   # 800 steps, lr 1e-4: the measured graded-forgetting setting
testbed.evaluate_all(model, tok)
"""

from llmreg.testbed.build import build, build_config, evaluate_all, load
from llmreg.testbed.finetune import finetune  # imports the trainers only when called
from llmreg.testbed.skills import NEW_SKILL, OLD_SKILLS, SKILLS, exact_match, make_examples

__all__ = [
    "build",
    "build_config",
    "evaluate_all",
    "load",
    "NEW_SKILL",
    "OLD_SKILLS",
    "SKILLS",
    "exact_match",
    "make_examples",
    "finetune",
]
