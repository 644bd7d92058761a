"""benchmarks/half_ft_sequence.py --smoke: both runs of the 3-task staged recipe train, evaluate and report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import REPO


@pytest.mark.slow
def test_half_ft_sequence_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, f"{REPO}/benchmarks/half_ft_sequence.py", "--smoke", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "half_ft_sequence.json").read_text())
    assert set(results) == {"vanilla", "half_ft"}
    for name, r in results.items():
        c = r["continual"]
        assert c["tasks"] == ["testbed_sort", "testbed_add", "testbed_recall"]
        assert len(c["R"]) == 3 and all(len(row) == 3 for row in c["R"])
        assert c["op"] == pytest.approx(sum(c["R"][-1]) / 3)
        assert c["bwt"] == pytest.approx(sum(c["R"][2][j] - c["R"][j][j] for j in range(2)) / 2)
        # each stage ran with the regularizers of its run: half_ft with a new stage index each time
        for i, stage in enumerate(["0_sort", "1_add", "2_recall"]):
            regs = yaml.safe_load((tmp_path / name / stage / "recipe.yaml").read_text())["regularizers"]
            assert regs == ([] if name == "vanilla" else [{"name": "half_ft", "seed": 0, "stage": i}])
    assert "| half_ft |" in proc.stdout and "| vanilla |" in proc.stdout
