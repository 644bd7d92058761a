"""benchmarks/pretrain_sweep.py: the --smoke run end to end into a tmp dir (never benchmarks/), the variant
check before any training, and --merge of a variant into existing results."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "pretrain_sweep.py"


def load_script():
    spec = importlib.util.spec_from_file_location("pretrain_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digest(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_smoke_run_writes_everything_into_the_tmp_dir(tmp_path):
    module = load_script()
    before = _digest(REPO / "benchmarks")
    out = tmp_path / "out"
    out.mkdir()
    (out / "RESULTS.md").write_text("# Results\n\nkept above\n")
    assert module.main(["--smoke", "--out", str(out)]) == 0
    assert _digest(REPO / "benchmarks") == before
    data = json.loads((out / "pretrain_sweep.json").read_text())
    base = data["variants"]["baseline"]
    points = base["grid"]["points"]
    assert len(points) == 4 and all(isinstance(p["eval_loss"], float) for p in points)
    assert base["best"]["eval_loss"] == min(p["eval_loss"] for p in points)
    ens = base["ensembles"]["paper"]
    assert ens["K"] == [1, 2] and ens["member_epochs"] == 2 * base["best"]["epochs"]
    assert ens["member_weight_decay"] == base["best"]["weight_decay"] / 2
    tuned = base["ensembles"]["tuned"]
    assert (tuned["member_epochs"], tuned["member_weight_decay"]) == (
        base["best"]["epochs"],
        base["best"]["weight_decay"],
    )
    assert tuned["member_losses"][0] == base["best"]["eval_loss"]  # member 0 is the grid's best run
    for e in (ens, tuned):
        assert e["logits"][0] == pytest.approx(e["member_losses"][0], rel=1e-5)  # K=1 is member 0's own loss
        assert e["probs"][1] <= sum(e["member_losses"]) / 2 + 1e-6
    assert len(base["sizes"]["params"]) == 3 and "fit" in base["sizes"]
    text = (out / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nkept above\n") and module.BEGIN in text and module.END in text
    for name in ("pretrain_sweep_wd.png", "pretrain_sweep_ensemble.png", "pretrain_sweep_sizes.png"):
        assert (out / "figures" / name).stat().st_size > 0
    # a second run reuses every finished run (nothing retrained) and --merge keeps the variant set
    assert module.main(["--smoke", "--out", str(out), "--merge"]) == 0
    again = json.loads((out / "pretrain_sweep.json").read_text())
    assert again["variants"]["baseline"]["grid"]["points"] == points


def test_smoke_needs_a_tmp_out_and_unknown_variants_fail_before_training(tmp_path, capsys):
    module = load_script()
    with pytest.raises(SystemExit):
        module.main(["--smoke"])
    with pytest.raises(SystemExit):
        module.main(["--smoke", "--out", str(REPO / "benchmarks" / "x")])
    with pytest.raises(SystemExit, match="unknown variant 'baselin'; did you mean 'baseline'"):
        module.main(["--smoke", "--out", str(tmp_path), "--variants", "baselin"])
    from llmreg.core.registry import available

    if "multipliers" not in available():  # before the lead merges it: refused by name, nothing trained
        with pytest.raises(SystemExit, match="variant 'multipliers': regularizers.1: unknown regularizer"):
            module.main(["--smoke", "--out", str(tmp_path), "--variants", "multipliers"])
        assert not (tmp_path / "work").exists()


def test_merge_adds_a_variant_and_refuses_other_settings():
    module = load_script()
    old = {
        "budget_tokens": 10,
        "grid": {"weight_decay": [0.1]},
        "model": {"h": 1},
        "block_size": 8,
        "learning_rate": 0.003,
        "variants": {"baseline": {"x": 1}},
        "command": "a",
        "total_seconds": 1.0,
    }
    new = dict(old, variants={"multipliers": {"x": 2}}, command="b", total_seconds=2.0)
    merged = module.merge_results(old, new)
    assert merged["variants"] == {"baseline": {"x": 1}, "multipliers": {"x": 2}} and merged["total_seconds"] == 3.0
    with pytest.raises(SystemExit, match="differ in 'budget_tokens'"):
        module.merge_results(old, dict(new, budget_tokens=20))
