"""Lp-Reg in RegGRPOTrainer with two processes: DeepSpeed ZeRO-2 and ZeRO-3 against plain DDP (CPU, gloo).

Both ranks sample with the same seed whatever the backend, so the two-process DDP run is the reference: the
same completions, the same global threshold on both ranks (gathered across ranks), the same losses and weights.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, max_rel_diff

WORKER = os.path.join(REPO, "tests", "workers", "grpo_worker.py")
STACK = [{"name": "lp_reg", "rho": 0.9, "minp_kappa": 0.7}]  # not negligible on the nearly uniform tiny model


def _run(out, zero: int, regularizers, spg: int | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29600 + zero * 7 + len(regularizers) + 3 * (spg or 0) + os.getpid() % 300),
        WORKER,
        "--zero",
        str(zero),
        "--out",
        str(out),
        "--regularizers",
        json.dumps(regularizers),
        "--steps",
        "4",
        *(["--steps-per-generation", str(spg)] if spg else []),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(os.path.join(out, "result.pt"), weights_only=False)


_DDP: dict = {}


def _ddp(tmp_path_factory, spg=None):
    if spg not in _DDP:
        _DDP[spg] = _run(tmp_path_factory.mktemp("ddp"), 0, STACK, spg)
    return _DDP[spg]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _ddp(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("zero,spg", [(2, None), (3, None), (3, 2)], ids=["zero2", "zero3", "zero3-off-policy"])
def test_lp_reg_under_zero_matches_ddp(zero, spg, tmp_path_factory, tmp_path):
    """spg 2: off-policy, the proxy rides on TRL's own old-log-prob pass (the LM head gathered inside it)."""
    ddp = _ddp(tmp_path_factory, spg)
    dist = _run(tmp_path, zero, STACK, spg)
    assert dist["world"] == ddp["world"] == 2
    assert dist["losses"] == pytest.approx(ddp["losses"], rel=1e-4, abs=1e-7)
    pen = [m["reg/lp_reg/penalty"] for m in dist["metrics"]]
    assert max(pen) > 1e-3
    assert pen == pytest.approx([m["reg/lp_reg/penalty"] for m in ddp["metrics"]], rel=1e-4, abs=1e-7)
    assert max_rel_diff(ddp["weights"], dist["weights"]) < 1e-4
    # global scope: one threshold per generation batch, the same on both ranks, and as under DDP
    rank0, rank1 = dist["thresholds"]
    assert rank0 == pytest.approx(rank1, rel=1e-6) and any(math.isfinite(t) for t in rank0)
    assert rank0 == pytest.approx(ddp["thresholds"][0], rel=1e-5)


@pytest.mark.slow
def test_penalty_moves_the_weights_under_ddp(ddp, tmp_path):
    plain = _run(tmp_path, 0, [])
    assert max_rel_diff(plain["weights"], ddp["weights"]) > 1e-4
