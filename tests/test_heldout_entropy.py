"""benchmarks/heldout_entropy.py: entropy and NLL sums equal their formulas, and the script's table holds the
per-token values of each model and the paired difference to the first."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from llmreg.data import tiny_llama

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import heldout_entropy

    return heldout_entropy


def test_entropy_and_nll_are_the_explicit_formulas(bench):
    gen = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(6, 9, generator=gen) * 3, torch.randint(0, 9, (6,), generator=gen)
    entropy, nll, count = bench.entropy_and_nll(logits, ids)
    expected_h = torch.distributions.Categorical(logits=logits[:-1]).entropy().sum()
    expected_nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum")
    assert count == 5
    assert entropy == pytest.approx(float(expected_h), rel=1e-5)
    assert nll == pytest.approx(float(expected_nll), rel=1e-5)
    # uniform logits: entropy log V at every position
    assert bench.entropy_and_nll(torch.zeros(4, 9), ids[:4])[0] == pytest.approx(3 * torch.log(torch.tensor(9.0)))


def test_script_reports_per_token_values_and_paired_differences(bench, tok, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("train line\n\n" + "\n\n".join(f"12 + {i} = {12 + i}" for i in range(5)) + "\n")
    folders = []
    for seed in (0, 1):
        model = tiny_llama(vocab_size=len(tok), seed=seed)
        folders.append(tmp_path / f"m{seed}")
        model.save_pretrained(folders[-1])
        tok.save_pretrained(folders[-1])
    args = [f"a={folders[0]}", f"b={folders[1]}", "--text", str(text), "--last", "5", "--paragraphs", "3"]
    assert bench.main(args) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| a |") or ln.startswith("| b |")]
    paragraphs = [f"12 + {i} = {12 + i}" for i in range(3)]  # the last 5 non-blank lines, the first 3 of them
    assert bench.heldout_paragraphs(text, 5, 3) == paragraphs
    per_model = []
    for folder in folders:
        model, tokenizer = bench.load(str(folder))
        per_model.append(bench.score(model, tokenizer, paragraphs, 256))
    a, b = per_model
    tokens = sum(s[2] for s in a)
    cells = [row.split("|")[2:6] for row in rows]
    assert float(cells[0][1]) == pytest.approx(sum(s[1] for s in a) / tokens, abs=1e-3)
    assert float(cells[1][0]) == pytest.approx(sum(s[0] for s in b) / tokens, abs=1e-3)
    assert cells[0][3].strip() == "+0.000 ± 0.000"  # the reference against itself
    diff = [(y[1] - x[1]) / x[2] for x, y in zip(a, b)]
    assert float(cells[1][3].split("±")[0]) == pytest.approx(sum(diff) / 3, abs=1e-3)
    assert abs(sum(diff)) > 1e-3  # two different models: the difference is not trivially 0
