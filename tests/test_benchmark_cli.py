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


STORIES260K = REPO.parent / "shared" / "data" / "models" / "stories260K"


def test_step_overhead_cli_times_a_given_checkpoint(tmp_path):
    """`--model PATH`: the variants start from that checkpoint (here stories260K, a real 260K-parameter Llama)."""
    out = tmp_path / "model.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(STORIES260K), "--steps", "1", "--warmup", "0",
         "--only", "l2_sp", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"vanilla", "l2_sp"}
    assert all(r["model"] == str(STORIES260K) and r["size"] == "model" for r in records.values())
    # stories260K: 260K parameters; the l2_sp anchor adds one fp32 copy of them to the tensor state
    vanilla_state = records["vanilla"]["state_mb"]
    assert 0.5 < vanilla_state["params"] * 2**20 / 4 / 1e5 < 5, vanilla_state
    assert "seq=128" in proc.stdout


def test_step_overhead_cli_rejects_a_missing_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tmp_path / "nope"), "--steps", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--model: not a model folder or a .gguf file" in proc.stderr
