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


def test_adam_step_share_counts_smollm2_and_the_trained_share(monkeypatch):
    """benchmarks/adam_step_share.py: SmolLM2-135M's shapes sum to its 134,515,008 weights (28,311,552 tied
    embedding + 30 layers of 3,540,096 + the final norm); the trained set is the embedding plus decoder tensors up
    to the share, and the step is timed."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import adam_step_share

    assert sum(math.prod(s) for s in adam_step_share.shapes()) == 134_515_008
    monkeypatch.setattr(adam_step_share, "shapes", lambda: [(10, 4), (4, 4), (4, 4), (4,)])  # 40 + 16 + 16 + 4
    total, trained, ms = adam_step_share.adam_step_ms(0.6)
    assert (total, trained) == (76, 56) and ms > 0  # 40 < 0.6 * 76 = 45.6: one more tensor, then stop
    assert adam_step_share.adam_step_ms(1.0)[1] == 76
