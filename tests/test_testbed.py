"""The forgetting testbed: skill generators, the exact-match scorer, a tiny build (reproducible, cached),
fine-tuning."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from llmreg import testbed
from llmreg.data.tokenizer import build_char_tokenizer
from llmreg.testbed import skills as S
from llmreg.testbed.build import load


@pytest.mark.parametrize("skill", S.SKILLS)
def test_generators_deterministic_and_correct(skill):
    a = S.make_examples(skill, 50, seed=3)
    assert a == S.make_examples(skill, 50, seed=3)
    assert a != S.make_examples(skill, 50, seed=4)
    assert S.make_examples(skill, 20, seed=3, split="eval") == S.make_examples(skill, 20, seed=3, split="eval")
    for prompt, answer in a:
        body = prompt[2:-1]
        if skill == "copy":
            assert answer == body
        elif skill == "reverse":
            assert answer == body[::-1]
        elif skill == "sort":
            assert answer == "".join(sorted(body))
        elif skill == "add":
            x, y = body.split("+")
            assert int(answer) == int(x) + int(y)
        elif skill == "sub":
            x, y = body.split("-")
            assert int(answer) == int(x) - int(y) >= 0
        else:
            assert S.fact_table()[body] == answer


@pytest.mark.parametrize("skill", [s for s in S.SKILLS if s != "recall"])
def test_train_and_eval_disjoint(skill):
    train = {p for p, _ in S.make_examples(skill, 5000, seed=0)}
    evals = S.make_examples(skill, 200, seed=0, split="eval")
    assert len({p for p, _ in evals}) == 200  # no repeats in eval
    assert not train & {p for p, _ in evals}


def test_recall_eval_is_the_fact_table():
    table = S.fact_table(table_seed=0)
    assert len(table) == S.TABLE_SIZE and table == S.fact_table(table_seed=0) != S.fact_table(table_seed=1)
    assert S.make_examples("recall", 10_000, split="eval") == [(f"K:{k}=", v) for k, v in table.items()]
    assert {p for p, _ in S.make_examples("recall", 500)} <= {f"K:{k}=" for k in table}


class _Oracle(torch.nn.Module):
    """A stub 'model' whose greedy continuation is a lookup: the answer (or a wrong one), newline, then padding."""

    def __init__(self, tok, answers: dict[str, str]):
        super().__init__()
        self.tok, self.answers = tok, answers

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids in input_ids:
            prompt = self.tok.decode(ids, skip_special_tokens=True)
            new = self.tok(self.answers[prompt] + "\n", add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(ids.tolist() + new + [self.tok.pad_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


def test_exact_match_scores_perfect_wrong_and_partial():
    tok = build_char_tokenizer()
    examples = S.make_examples("add", 40, split="eval") + S.make_examples("reverse", 40, split="eval")
    right = {p: a for p, a in examples}
    assert S.exact_match(_Oracle(tok, right), tok, examples, batch_size=16) == 1.0
    wrong = {p: a + "1" for p, a in examples}
    assert S.exact_match(_Oracle(tok, wrong), tok, examples) == 0.0
    half = {p: (a if i % 2 else a[:-1]) for i, (p, a) in enumerate(examples)}
    assert S.exact_match(_Oracle(tok, half), tok, examples) == 0.5
    assert tok.padding_side == "right"  # restored after left-padded generation


def test_exact_match_on_a_real_model_that_learned_copy():
    """A tiny model trained briefly on one easy skill scores high on it; its untrained twin scores 0."""
    from llmreg.testbed.build import build_config, make_model, train

    cfg = build_config(seed=0, size="tiny", steps=1, skills=["copy"])
    fresh = make_model("tiny", len(build_char_tokenizer()), 0)
    tok = build_char_tokenizer()
    evals = [(f"C:{w}=", w) for w in ("abc", "xyz", "qqq", "mno")]
    assert S.exact_match(fresh, tok, evals) == 0.0
    cfg.update(steps=500, lr=3e-3, warmup=10, batch_size=32)
    model, tok = train(cfg, log=lambda s: None)
    assert S.exact_match(model, tok, S.make_examples("copy", 50, split="eval")) >= 0.3  # 0.52 measured


def test_tiny_build_is_reproducible_and_cached(tmp_path, monkeypatch):
    kw = dict(size="tiny", steps=20, batch_size=16, eval_n=20)
    p1 = testbed.build(cache_dir=tmp_path / "a", seed=0, log=lambda s: None, **kw)
    p2 = testbed.build(cache_dir=tmp_path / "b", seed=0, log=lambda s: None, **kw)
    assert p1.name == p2.name and p1.parent.parent == tmp_path
    m1, _, s1 = load(p1)
    m2, _, s2 = load(p2)
    assert s1 == s2 and set(s1) == set(S.SKILLS)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    p3 = testbed.build(cache_dir=tmp_path / "a", seed=1, log=lambda s: None, **kw)
    assert p3 != p1 and not torch.equal(load(p3)[0].lm_head.weight, m1.lm_head.weight)
    meta = json.loads((p1 / "testbed.json").read_text())
    assert meta["config"]["steps"] == 20 and meta["config"]["seed"] == 0

    B = importlib.import_module("llmreg.testbed.build")  # `llmreg.testbed.build` the attribute is the function

    def boom(*a, **k):
        raise AssertionError("retrained a cached build")

    monkeypatch.setattr(B, "train", boom)
    assert testbed.build(cache_dir=tmp_path / "a", seed=0, log=lambda s: None, **kw) == p1


def test_default_cache_is_outside_the_repo(monkeypatch, tmp_path):
    from llmreg.testbed.build import default_cache_root

    monkeypatch.delenv("LLMREG_CACHE", raising=False)
    assert str(default_cache_root()).endswith(".cache/llmreg/testbed")
    monkeypatch.setenv("LLMREG_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path / "testbed"
    with pytest.raises(ValueError, match="unknown build options"):
        testbed.build_config(stepz=3)


def test_finetune_learns_the_new_skill_and_takes_regularizers(tmp_path):
    """Fine-tuning moves the weights toward the new skill (its loss falls); a regularizer stack is accepted."""
    from llmreg.testbed.build import encode, pad_batch

    path = testbed.build(cache_dir=tmp_path, size="tiny", steps=20, batch_size=16, eval_n=10, log=lambda s: None)
    base, tok, _ = load(path)

    def sub_loss(model):
        ids, labels = encode(tok, S.make_examples("sub", 64, seed=9, split="eval"))
        x, m, y = pad_batch(ids, labels, tok.pad_token_id)
        with torch.no_grad():
            return model(input_ids=x, attention_mask=m, labels=y).loss.item()

    tuned = testbed.finetune(path, "sub", steps=30, lr=3e-3, batch_size=16)
    assert sub_loss(tuned) < sub_loss(base) - 0.1
    again = testbed.finetune(path, "sub", steps=30, lr=3e-3, batch_size=16)
    assert torch.equal(tuned.lm_head.weight, again.lm_head.weight)  # deterministic
    reg = testbed.finetune(path, "sub", steps=30, lr=3e-3, batch_size=16, regularizers=[{"name": "l2_sp", "lam": 10.0}])
    assert not torch.equal(reg.lm_head.weight, tuned.lm_head.weight)
    scores = testbed.evaluate_all(tuned, tok, ["copy", "sub"], eval_n=5)
    assert set(scores) == {"copy", "sub"} and all(0.0 <= v <= 1.0 for v in scores.values())


def test_forget_summary_counts_old_skills_only():
    from llmreg.testbed.__main__ import summarize

    before = {"copy": 1.0, "add": 0.9, "sub": 0.1}
    after = {"copy": 0.5, "add": 0.7, "sub": 0.85}
    out = summarize(before, after)
    assert out["drop_points"] == {"copy": 50.0, "add": 20.0}
    assert out["avg_old_drop_points"] == 35.0 and out["new_skill"] == 0.85


def test_check_build_options_presets_and_errors():
    from llmreg.testbed.build import check_build_options

    assert check_build_options("default") == {"seed": 0}
    assert check_build_options({"size": "tiny", "steps": 20, "seed": 3, "lr": 1}) == {
        "seed": 3,
        "size": "tiny",
        "steps": 20,
        "lr": 1,
    }
    assert check_build_options(check_build_options({"steps": 5})) == {"seed": 0, "steps": 5}  # idempotent
    for spec, message in [
        ("defualt", "did you mean 'default'"),
        ({"stepz": 1}, "did you mean 'steps'"),
        ({"size": "smal"}, "did you mean 'small'"),
        ({"steps": 1.5}, "steps: expected int"),
        ({"seed": True}, "seed: expected int"),
        ({"skills": ["srot"]}, "did you mean 'sort'"),
        (3, "expected a preset name or a mapping"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_build_options(spec)
