"""benchmarks/forgetting_pareto.py: the --smoke run end to end (both setups, every method, all outputs), the
method-spec contract (`prepare`), the --methods filter and the RESULTS.md section replacement."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "forgetting_pareto.py"
SETUPS = {"testbed", "stories260k"}


def load_script():
    spec = importlib.util.spec_from_file_location("forgetting_pareto", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_every_setup_and_method(tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "RESULTS.md").write_text("# Results\n\nkept above\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    methods = set(load_script().METHODS)
    assert {"vanilla", "l2_sp"} <= methods

    data = json.loads((out / "forgetting_pareto.json").read_text())
    assert set(data["setups"]) == SETUPS and set(data["methods"]) == methods
    for name, setup in data["setups"].items():
        report = setup["report"]
        assert set(report["runs"]) == methods, name
        assert set(report["pareto_front"]) <= methods and report["pareto_front"]
        for run in report["runs"].values():
            assert run["target_gain"] is not None and run["forgetting"] is not None
            assert set(run["tasks"]) == set(report["base"])
    testbed = data["setups"]["testbed"]
    assert set(testbed["report"]["base"]) == {
        f"testbed_{s}" for s in ("sub", "copy", "reverse", "sort", "add", "recall")
    }
    assert testbed["build"]["size"] == "tiny" and Path(testbed["base_model"]).is_relative_to(out)  # not ~/.cache
    assert data["setups"]["testbed"]["report"]["runs"]["l2_sp"]["regularizers"] == [{"name": "l2_sp"}]

    md = (out / "RESULTS.md").read_text()
    assert md.startswith("# Results\n\nkept above\n") and md.count("<!-- forgetting_pareto:begin -->") == 1
    for name in SETUPS:
        assert f"### {name}" in md
        for kind in ("pareto", "deltas"):
            png = out / "figures" / f"forgetting_{kind}_{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
            assert f"figures/forgetting_{kind}_{name}.png" in md
    for method in methods:
        assert f"| {method} |" in md
    assert not (REPO / "benchmarks" / "work").exists()


def test_prepare_gets_base_workdir_steps_and_its_list_is_used(tmp_path):
    fp = load_script()
    seen = []

    def prepare(base, workdir, steps):
        seen.append((base, workdir, steps, os.path.isdir(workdir)))
        return [{"name": "l2_sp", "lam": 2.0}]

    got = fp.method_regularizers(
        "m", {"regularizers": [{"name": "ignored"}], "prepare": prepare}, "/base", tmp_path / "w", 7
    )
    assert got == {"regularizers": [{"name": "l2_sp", "lam": 2.0}], "model": None}
    assert seen == [("/base", str(tmp_path / "w"), 7, True)]
    assert fp.method_regularizers("v", {"regularizers": [{"name": "l2_sp"}]}, "/b", tmp_path / "x", 1) == {
        "regularizers": [{"name": "l2_sp"}],
        "model": None,
    }
    # a prepare that also names the model to start from (forgetting_penalty with SI)
    both = fp.method_regularizers(
        "s", {"prepare": lambda b, w, n: {"regularizers": [], "model": "/phase1"}}, "/b", tmp_path / "z", 1
    )
    assert both == {"regularizers": [], "model": "/phase1"}
    with pytest.raises(ValueError, match="unknown keys \\['regularisers'\\]"):
        fp.method_regularizers("bad", {"regularisers": []}, "/b", tmp_path / "y", 1)


def test_methods_filter_and_smoke_needs_out(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--methods", "l2sp"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "unknown method 'l2sp'; did you mean 'l2_sp'?" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "--smoke needs --out" in proc.stderr
    assert list(load_script().select_methods(["l2_sp"])) == ["l2_sp"]


def test_replace_section_keeps_the_rest(tmp_path):
    fp = load_script()
    path = tmp_path / "R.md"
    path.write_text(f"# R\n\nbefore\n\n{fp.BEGIN}\nold\n{fp.END}\n\nafter\n")
    fp.replace_section(path, f"{fp.BEGIN}\nnew\n{fp.END}")
    assert path.read_text() == f"# R\n\nbefore\n\n{fp.BEGIN}\nnew\n{fp.END}\n\nafter\n"
    fresh = tmp_path / "new.md"
    fp.replace_section(fresh, f"{fp.BEGIN}\nx\n{fp.END}")
    assert fresh.read_text().endswith(f"{fp.BEGIN}\nx\n{fp.END}\n")


def _result(runs: dict[str, tuple[float, float]], steps: int = 800) -> dict:
    report = {"runs": {n: {"forgetting": f, "target_gain": g} for n, (f, g) in runs.items()}, "pareto_front": []}
    return {
        "command": "c",
        "total_seconds": 1.0,
        "methods": {n: {} for n in runs},
        "setups": {"testbed": {"steps": steps, "base_model": "b", "limit": None, "report": report}},
    }


def test_merge_keeps_old_methods_replaces_rerun_ones_and_recomputes_the_front():
    fp = load_script()
    old = _result({"vanilla": (0.5, 0.8), "l2_sp": (0.3, 0.7)})
    new = _result({"l2_sp": (0.1, 0.75), "lfu": (0.4, 0.9)})
    merged = fp.merge_results(old, new)
    runs = merged["setups"]["testbed"]["report"]["runs"]
    assert set(runs) == {"vanilla", "l2_sp", "lfu"}
    assert runs["l2_sp"]["forgetting"] == 0.1  # replaced by the new run
    # vanilla (0.5 forgotten, 0.8 gained) is dominated by lfu (0.4, 0.9); l2_sp and lfu are on the front
    assert sorted(merged["setups"]["testbed"]["report"]["pareto_front"]) == ["l2_sp", "lfu"]
    assert old["setups"]["testbed"]["report"]["runs"]["l2_sp"]["forgetting"] == 0.3  # input untouched
    with pytest.raises(SystemExit, match="steps"):
        fp.merge_results(old, _result({"lfu": (0.4, 0.9)}, steps=10))
