"""benchmarks/forgetting_real.py (issue 18): the CI version of the benchmark (setting `tiny`: stories260K, a few
steps, vanilla + l2_sp + WiSE-FT) end to end with its caches; the run keys; the chat-format pieces the smollm2
setting relies on (data.train.chat, the SmolLM2 chat rendering of the GSM8K eval tasks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "forgetting_real.py"
GGUF = REPO.parent / "shared" / "data" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--setting", "tiny", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def bench_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import forgetting_real

    return forgetting_real


def test_tiny_pipeline_runs_caches_and_reports(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    (out / "RESULTS.md").write_text("# Results\n\nkept above\n")
    proc = run_script("--workdir", str(work), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "forgetting_real_tiny.json").read_text())
    assert set(data["runs"]) == {"vanilla", "l2_sp", "wise-ft 0.5", "vanilla lr=0.01"}
    report = data["report"]
    for name, run in report["runs"].items():
        tasks = run["tasks"]
        assert set(tasks) == {"gsm8k_ppl", "tinystories_ppl"}, name
        assert run["target_gain"] == pytest.approx(tasks["gsm8k_ppl"]["base"] - tasks["gsm8k_ppl"]["tuned"])
    # WiSE-FT at 0.5 is a different model from both ends
    assert report["runs"]["wise-ft 0.5"]["tasks"]["tinystories_ppl"]["tuned"] != pytest.approx(
        report["runs"]["vanilla"]["tasks"]["tinystories_ppl"]["tuned"]
    )
    results = (out / "RESULTS.md").read_text()
    assert results.startswith("# Results\n\nkept above") and "| wise-ft 0.5 | wise-ft |" in results
    assert (out / "figures" / "forgetting_real_tiny.png").stat().st_size > 1000
    # the run labelled with another regime gets a figure of its own, linked from the section
    assert (out / "figures" / "forgetting_real_tiny_high_lr.png").stat().st_size > 1000
    assert "(figures/forgetting_real_tiny_high_lr.png)" in results
    # the head-to-head table: each run against vanilla (paired over the documents), with a verdict
    verdict_rows = [ln for ln in results.splitlines() if ln.startswith("| l2_sp |") and "vs vanilla" not in ln]
    assert any("on the front" in ln or "dominated by" in ln for ln in verdict_rows)
    assert "| vanilla | (reference) | (reference) |" in results

    # a rerun trains and evaluates nothing: the records are read back unchanged
    records = sorted(work.rglob("run.json")) + sorted(work.rglob("*eval-*.json"))
    before = {p: p.stat().st_mtime_ns for p in records}
    again = run_script("--only", "vanilla,wise-ft 0.5", "--workdir", str(work), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stdout and "evaluating" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in records} == before

    listing = run_script("--list", "--workdir", str(work), cwd=tmp_path)
    assert "base: evaluated" in listing.stdout and listing.stdout.count("trained+evaluated") == 4

    # the high-lr run has a section of its own, judged against its regime's reference, the recipe's vanilla beside
    hot = results.split("<!-- forgetting_real:high lr:begin -->")[1].split("<!-- forgetting_real:high lr:end -->")[0]
    assert "| vanilla lr=0.01 | (reference) | (reference) |" in hot and "| vanilla | " in hot
    assert "| l2_sp |" not in hot and "| vanilla lr=0.01 |" not in results.split("<!-- forgetting_real:end -->")[0]


def test_a_lost_workdir_is_restored_from_the_committed_records(tmp_path):
    """The json and its per-document companion are enough: with the workdir gone, --report rewrites the same
    outputs and --list counts every run done; a record committed without per-document scores keeps its report
    entry, and the section it was judged in is not replaced by one that cannot judge it."""
    work, out = tmp_path / "work", tmp_path / "out"
    assert run_script("--workdir", str(work), "--out", str(out), cwd=tmp_path).returncode == 0
    names = ["forgetting_real_tiny.json", "forgetting_real_tiny_per_doc.jsonl", "RESULTS.md"]
    before = {n: (out / n).read_text() for n in names}
    lines = before["forgetting_real_tiny_per_doc.jsonl"].splitlines()
    assert [json.loads(ln)["run"] for ln in lines] == ["(base)", "vanilla", "l2_sp", "wise-ft 0.5", "vanilla lr=0.01"]

    shutil.rmtree(work)
    proc = run_script("--report", "--workdir", str(work), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0 and "restored 9 records" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "kept the RESULTS.md section" not in proc.stdout  # every run could be paired: both sections rewritten
    assert {n: (out / n).read_text() for n in names} == before
    listing = run_script("--list", "--workdir", str(work), "--out", str(out), cwd=tmp_path)
    assert listing.stdout.count("trained+evaluated") == 4

    # l2_sp as if reported before per-document scores were committed: shown with its entry, not re-paired
    (out / "forgetting_real_tiny_per_doc.jsonl").write_text("".join(ln + "\n" for ln in lines if '"l2_sp"' not in ln))
    shutil.rmtree(work)
    proc = run_script("--report", "--workdir", str(work), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0 and "kept the RESULTS.md section of the recipe regime" in proc.stdout, proc.stderr
    assert (out / "RESULTS.md").read_text() == before["RESULTS.md"]
    data, old = (json.loads(t) for t in ((out / names[0]).read_text(), before[names[0]]))
    assert data["report"]["runs"]["l2_sp"] == old["report"]["runs"]["l2_sp"]
    assert "l2_sp" not in (out / names[1]).read_text()


def _scores(target, keep, side=(0.5, 0.5, 0.5, 0.5)):
    """Scores of a run on a toy suite: target t (per-document nats and 1 byte each), retained r (gold_prob) and the
    weight-0 retained q."""
    from llmreg.eval.run import Scores

    per_doc = {
        "t": {"metric": "bits_per_byte,none", "values": {str(i): [-x, 1.0] for i, x in enumerate(target)}},
        "r": {"metric": "gold_prob", "values": {str(i): x for i, x in enumerate(keep)}},
        "q": {"metric": "gold_prob", "values": {str(i): x for i, x in enumerate(side)}},
    }
    bpb = sum(target) / len(target) / 0.6931471805599453
    values = {"t": bpb, "r": sum(keep) / len(keep), "q": sum(side) / len(side)}
    return Scores(values, {"t": "bits_per_byte,none", "r": "gold_prob", "q": "gold_prob"}, per_doc)


def _toy_suite():
    from llmreg.eval.suite import Suite, TaskEntry

    retain = [TaskEntry("r", metric="gold_prob"), TaskEntry("q", metric="gold_prob", weight=0)]
    return Suite(path="/x.yaml", target=[TaskEntry("t")], retain=retain)


def test_seed_table_pairs_the_seeds_and_curves_follow_strength():
    """Two seeds of one (method, strength) get a row whose last cell is the second seed against the first, paired
    (by hand: target 0.05 nats/byte better, retention 0.02 worse); a method's points are drawn in strength order."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from forgetting_real_report import curves, dominates, of_regime, regimes, seed_groups, seed_table, seed_variance

    from llmreg.eval.run import forgetting_report

    suite = _toy_suite()
    evaluated = {
        "vanilla": _scores([1.0, 2.0, 1.5, 1.2], [0.6, 0.7, 0.5, 0.8]),
        "vanilla seed1": _scores([0.95, 1.95, 1.45, 1.15], [0.58, 0.68, 0.48, 0.78]),
        "l2_sp lam=1": _scores([1.2, 2.2, 1.7, 1.4], [0.7, 0.8, 0.6, 0.9]),
        "l2_sp": _scores([1.1, 2.1, 1.6, 1.3], [0.65, 0.75, 0.55, 0.85]),
        "wise-ft 0.5": _scores([1.1, 2.1, 1.6, 1.3], [0.65, 0.75, 0.55, 0.85]),
        "wise-ft 0.5 seed1": _scores([1.0, 2.0, 1.5, 1.2], [0.65, 0.75, 0.55, 0.85]),
    }
    configs = {
        "vanilla": {"method": "vanilla", "strength": None, "seed": 0},
        "vanilla seed1": {"method": "vanilla", "strength": None, "seed": 1},
        "l2_sp lam=1": {"method": "l2_sp", "strength": 1.0, "seed": 0},
        "l2_sp": {"method": "l2_sp", "strength": 0.01, "seed": 0},
        "wise-ft 0.5": {"method": "wise-ft", "strength": 0.5, "seed": 0, "merge": {"of": "vanilla", "alpha": 0.5}},
        # listed first, and its own seed field left at 0: the seed is the merged run's
        "wise-ft 0.5 seed1": {"method": "wise-ft", "strength": 0.5, "seed": 0, "merge": {"of": "vanilla seed1"}},
    }
    state = {"runs": {n: {"train": {"config": c}} for n, c in configs.items()}}
    assert seed_groups(state, evaluated) == {("vanilla", None): ["vanilla", "vanilla seed1"]}
    assert of_regime(state, evaluated, None) == evaluated and regimes(state) == []
    evaluated = {"wise-ft 0.5 seed1": evaluated.pop("wise-ft 0.5 seed1"), **evaluated}
    assert seed_groups(state, evaluated, merges=True)[("wise-ft", 0.5)] == ["wise-ft 0.5", "wise-ft 0.5 seed1"]
    # a pair in another regime (a far higher rate) is shown with `regimes` but not pooled with the recipe's
    hot = {"method": "vanilla", "strength": 1e-3, "regime": "lr 1e-3"}
    hot_state = {"runs": {**state["runs"], "hot": {"train": {"config": {**hot, "seed": 0}}}}}
    hot_state["runs"]["hot seed1"] = {"train": {"config": {**hot, "seed": 1}}}
    with_hot = {**evaluated, "hot seed1": evaluated["vanilla"], "hot": evaluated["vanilla"]}
    assert ("vanilla", 1e-3) not in seed_groups(hot_state, with_hot)
    assert seed_groups(hot_state, with_hot, regimes=True)[("vanilla", 1e-3)] == ["hot", "hot seed1"]
    assert set(of_regime(hot_state, with_hot, "lr 1e-3")) == {"hot", "hot seed1"} and regimes(hot_state) == ["lr 1e-3"]
    assert set(of_regime(hot_state, with_hot, None)) == set(evaluated)
    base = _scores([2.0, 3.0, 2.5, 2.2], [0.6, 0.7, 0.5, 0.8])
    report = forgetting_report(base, evaluated, suite)
    rows = seed_table(state, suite, evaluated, report)
    assert len(rows) == 4 and rows[3].startswith("| vanilla | vanilla, vanilla seed1 |")
    assert rows[2].startswith("| wise-ft (0.5) | wise-ft 0.5, wise-ft 0.5 seed1 |")
    diff = rows[3].rstrip(" |").rsplit("| ", 1)[1]  # target / retention / q
    target, retention, side = (float(c.split(" ± ")[0]) for c in diff.split(" / "))
    assert target == pytest.approx(0.05 / 0.6931471805599453, rel=1e-3)
    assert retention == pytest.approx(-0.02) and side == pytest.approx(0.0)
    # the seed pair's differences are the same on every document (paired SE 0): all of d^2 is training noise
    ln2 = 0.6931471805599453
    seed_var = seed_variance(suite, evaluated, seed_groups(state, evaluated))
    assert seed_var == pytest.approx([(0.05 / ln2) ** 2, 0.02**2, 0.0])
    # a target gain of 0.1 (SE 0.01) is beyond 2 paired SE, and within 2 x sqrt(SE^2 + 0.1^2)
    h = {"target_gain": 0.1, "target_gain_se": 0.01, "forgetting": 0.0, "forgetting_se": 0.01}
    h["tasks"] = {"q": {"gain": 0.0, "se": 0.01}}
    assert dominates(h, suite) and not dominates(h, suite, [0.1**2, 0.0, 0.0])
    assert dominates(h, suite, [0.01**2, 0.0, 0.0])  # sqrt(2) x 0.01 of noise: still beyond
    points = curves(state, report["runs"], lambda r: (r["forgetting"], None))
    assert set(points) == {"l2_sp"}  # vanilla has no strength; wise-ft has one point
    gains = [report["runs"][n]["target_gain"] for n in ("l2_sp", "l2_sp lam=1")]
    assert [y for _, y in points["l2_sp"]] == pytest.approx(gains)


def test_head_to_head_differences_and_dominance():
    """head_to_head(a, b) is the report of a with b as its base: its target gain is b's target score minus a's
    (bits per byte, lower is better), and dominance needs one axis beyond 2 SE with the other no worse."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from forgetting_real_report import dominates, head_to_head

    scores, suite = _scores, _toy_suite()
    runs = {
        "a": scores([1.0, 2.0, 1.5, 1.2], [0.6, 0.7, 0.5, 0.8]),
        "b": scores([1.1, 2.1, 1.6, 1.3], [0.6, 0.7, 0.5, 0.8]),  # a learned better by 0.1 nats/byte everywhere
    }
    h = head_to_head(suite, runs, "a", "b")
    assert h["target_gain"] == pytest.approx(0.1 / 0.6931471805599453) and h["forgetting"] == pytest.approx(0.0)
    assert dominates(h, suite) and not dominates(head_to_head(suite, runs, "b", "a"), suite)
    # kept less, within noise (d = [-0.1, 0, 0, 0]: mean -0.025, SE 0.025): still dominates
    runs["a"] = scores([1.0, 2.0, 1.5, 1.2], [0.5, 0.7, 0.5, 0.8])
    assert dominates(head_to_head(suite, runs, "a", "b"), suite)
    # kept less beyond noise (d = [-0.1, -0.11, -0.09, -0.1]): no dominance either way
    runs["a"] = scores([1.0, 2.0, 1.5, 1.2], [0.5, 0.59, 0.41, 0.7])
    assert not dominates(head_to_head(suite, runs, "a", "b"), suite)
    assert not dominates(head_to_head(suite, runs, "b", "a"), suite)
    # a weight-0 retained task is an axis of its own: worse there beyond noise is no dominance
    runs["a"] = scores([1.0, 2.0, 1.5, 1.2], [0.6, 0.7, 0.5, 0.8], side=(0.4, 0.41, 0.39, 0.4))
    assert not dominates(head_to_head(suite, runs, "a", "b"), suite)


def test_unknown_run_is_refused(tmp_path):
    proc = run_script("--only", "vanila", "--workdir", str(tmp_path), "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "unknown run(s) ['vanila']" in proc.stderr


def test_run_keys_follow_the_config_not_the_name():
    fr = bench_module()
    runs = fr.MATRICES["smollm2"]()
    by_name = {r["name"]: r for r in runs}
    keys = {r["name"]: fr.run_key("smollm2", r, by_name) for r in runs}
    assert len(set(keys.values())) == len(runs)  # every run its own model
    renamed = {**by_name["vanilla"], "name": "plain"}
    assert fr.run_key("smollm2", renamed, by_name) == keys["vanilla"]
    # a merge's key changes with the run it merges
    seed1 = {**by_name, "vanilla": by_name["vanilla seed1"]}
    assert fr.run_key("smollm2", by_name["wise-ft 0.5"], seed1) != keys["wise-ft 0.5"]


def test_chat_source_wraps_prompt_and_completion(tmp_path):
    from llmreg.core.options import ConfigError
    from llmreg.recipe.schema import SourceSpec
    from llmreg.recipe.sources import load_source, validate_data

    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2", "other": 0}) + "\n")
    spec = SourceSpec(path=str(path), prompt_field="question", completion_field="answer", chat=True)
    row = load_source(spec, "sft", "train")[0]
    assert row == {
        "prompt": [{"role": "user", "content": "1+1?"}],
        "completion": [{"role": "assistant", "content": "2"}],
    }
    with pytest.raises(ConfigError, match=r"data.train.chat: needs prompt_field and completion_field"):
        validate_data({"train": {"path": str(path), "chat": True}}, None)


def test_smollm2_chat_context_is_the_tokenizers_own_template():
    """eval/tasks/llmreg_tasks.smollm2_chat_context + chat_answer render what TRL trains on: the GGUF
    tokenizer's chat template over (user question, assistant answer)."""
    from llmreg.recipe.models import build_tokenizer
    from llmreg.recipe.schema import TokenizerSpec

    sys.path.insert(0, str(REPO / "eval" / "tasks"))
    import llmreg_tasks

    tok = build_tokenizer(TokenizerSpec(name_or_path=str(GGUF.parent), gguf_file=GGUF.name))
    doc = {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}
    user = [{"role": "user", "content": doc["question"]}]
    whole = user + [{"role": "assistant", "content": doc["answer"]}]
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert llmreg_tasks.smollm2_chat_context(doc) == prompt
    rendered = tok.apply_chat_template(whole, tokenize=False)
    assert rendered.rstrip("\n") == prompt + llmreg_tasks.chat_answer(doc)


def test_chat_data_check_opens_a_gguf_tokenizer():
    """Chat-format data is checked against the tokenizer's chat template; a GGUF tokenizer (the file's folder +
    gguf_file) used to be opened as a plain tokenizer folder and failed validation."""
    from llmreg.recipe.data_checks import check_chat_template
    from llmreg.recipe.schema import TokenizerSpec

    check_chat_template(TokenizerSpec(name_or_path=str(GGUF.parent), gguf_file=GGUF.name), "data.train")
