"""Forgetting evaluation: continual metrics, suites, local lm-eval tasks and the report (real stories260K)."""

from __future__ import annotations

import pytest

from llmreg.core.options import ConfigError
from llmreg.eval import continual_metrics


def test_continual_metrics_hand_worked_3x3():
    R = [[0.8, 0.1, 0.2],
         [0.6, 0.9, 0.3],
         [0.5, 0.7, 0.95]]
    baseline = [0.25, 0.05, 0.1]
    # op  = (0.5 + 0.7 + 0.95) / 3 = 2.15 / 3 = 0.716667
    # bwt = ((0.5 - 0.8) + (0.7 - 0.9)) / 2 = (-0.3 - 0.2) / 2 = -0.25
    # fwt = ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.1 - 0.05) + (0.3 - 0.1)) / 2 = 0.25 / 2 = 0.125
    m = continual_metrics(R, baseline)
    assert m["op"] == pytest.approx(0.716667, abs=1e-6)
    assert m["bwt"] == pytest.approx(-0.25)
    assert m["fwt"] == pytest.approx(0.125)
    assert continual_metrics(R)["fwt"] is None


def test_continual_metrics_accepts_arrays_and_rejects_bad_shapes():
    import numpy as np

    assert continual_metrics(np.eye(2))["bwt"] == pytest.approx(-1.0)
    with pytest.raises(ConfigError, match="square"):
        continual_metrics([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ConfigError, match="empty"):
        continual_metrics([])
    with pytest.raises(ConfigError, match="baseline has 1"):
        continual_metrics([[1, 2], [3, 4]], baseline=[0.0])
