"""Forgetting evaluation: continual-learning metrics, lm-eval suites (target vs retained tasks), reports.

Only `continual_metrics` and `load_suite` import eagerly; running lm-eval lives in `llmreg.eval.run`.
"""

from llmreg.eval.continual import continual_metrics
from llmreg.eval.suite import load_suite

__all__ = ["continual_metrics", "load_suite"]
