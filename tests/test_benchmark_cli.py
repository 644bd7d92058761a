"""The step-overhead benchmark's command line, end to end on the tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "step_overhead.py"
REQUIRED = {"name", "trainer", "step_time_ratio", "peak_mem_ratio"}


def test_step_overhead_cli_writes_ratios(tmp_path):
    out = tmp_path / "overhead.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU path, wherever the test runs
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--steps", "2", "--only", "l2_sp", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())
    by_name = {r["name"]: r for r in records}
    assert set(by_name) == {"vanilla", "l2_sp"}
    for record in records:
        assert REQUIRED <= set(record), record
        assert record["trainer"] == "hf"
        for key in ("step_time_ratio", "peak_mem_ratio"):
            value = record[key]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, record)
    assert by_name["vanilla"]["step_time_ratio"] == 1.0
    assert by_name["vanilla"]["peak_mem_ratio"] == 1.0
    # l2_sp keeps one fp32 anchor per trainable parameter: its tensor state must exceed vanilla's
    assert by_name["l2_sp"]["peak_mem_ratio"] > 1.0
    assert "| l2_sp | hf |" in proc.stdout


def test_step_overhead_cli_rejects_unknown_name(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--steps", "1", "--only", "l2sp"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "did you mean 'l2_sp'" in proc.stderr


def test_step_overhead_cli_grpo_mode(tmp_path):
    """`--trainer grpo`: vanilla RegGRPOTrainer against lp_reg with the same generation settings."""
    out = tmp_path / "grpo.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--trainer",
            "grpo",
            "--size",
            "tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--only",
            "lp_reg",
            "--json",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_name = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(by_name) == {"vanilla", "lp_reg"}
    assert all(r["trainer"] == "grpo" and r["steps"] == 2 for r in by_name.values())
    assert by_name["vanilla"]["step_time_ratio"] == 1.0 and by_name["lp_reg"]["step_time_ratio"] > 0
    assert "| lp_reg | grpo |" in proc.stdout
