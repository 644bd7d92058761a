"""benchmarks/rlvr_entropy.py --smoke: the three RLVR recipes train, log entropy and reward every step, evaluate
and plot, and nothing is written under benchmarks/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.slow
def test_rlvr_entropy_smoke(tmp_path):
    bench = REPO + "/benchmarks"
    before = {p: p.stat().st_mtime for p in Path(bench).rglob("*") if p.is_file()}
    proc = subprocess.run(
        [sys.executable, f"{bench}/rlvr_entropy.py", "--smoke", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "rlvr_entropy.json").read_text())
    assert set(results["runs"]) == {"grpo", "grpo_entropy", "lp_reg"} and results["config"]["smoke"]
    for method, runs in results["runs"].items():
        (r,) = runs
        assert r["steps"] == [1, 2] and len(r["entropy"]) == len(r["reward"]) == 2
        assert all(e > 0 for e in r["entropy"]) and all(0 <= x <= 1 for x in r["reward"])
        assert 0 <= r["greedy"] <= 1 and 0 <= r["pass@8"] <= 1
        assert (r["reg/lp_reg/selected_share"][0] is not None) == (method == "lp_reg")
    recipe = (tmp_path / "grpo_entropy_seed0" / "recipe.yaml").read_text()
    assert "entropy_coef: 0.002" in recipe
    assert (tmp_path / "rlvr_entropy.png").stat().st_size > 0
    assert "| lp_reg |" in proc.stdout
    after = {p: p.stat().st_mtime for p in Path(bench).rglob("*") if p.is_file()}
    assert after == before
