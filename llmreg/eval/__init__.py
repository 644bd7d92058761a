"""Forgetting evaluation: continual-learning metrics, lm-eval suites (target vs retained tasks), reports.

Only `continual_metrics` and `load_suite` import eagerly; running lm-eval lives in `llmreg.eval.run`, and
`EvalSuiteCallback` (eval during training, llmreg.eval.callback) imports transformers only when first used.
"""

from llmreg.eval.continual import continual_metrics
from llmreg.eval.suite import load_suite

__all__ = ["EvalSuiteCallback", "continual_metrics", "load_suite"]


def __getattr__(name: str):
    if name == "EvalSuiteCallback":  # lazy: transformers takes seconds to import
        from llmreg.eval.callback import EvalSuiteCallback

        return EvalSuiteCallback
    raise AttributeError(f"module 'llmreg.eval' has no attribute '{name}'")
