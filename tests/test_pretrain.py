"""Pre-training under infinite compute (arXiv 2509.14786): the pretrain data mode, `llmreg sweep` (grid checks,
resume, neighbour certificate), power-law fits, ensemble evaluation against a hand computation, distillation."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

from llmreg.core.options import ConfigError
from llmreg.recipe import load_recipe, validate_recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.abspath(os.path.join(REPO, "..", "shared", "data"))
TEXT = os.path.join(SHARED, "tinystories", "tinystories_validation_first1000.txt")
TOKENIZER = os.path.join(SHARED, "models", "stories260K")
PRETRAIN = os.path.join(REPO, "recipes", "pretrain")


def tiny_pretrain(out_dir, **extra) -> dict:
    """A pretrain recipe small enough to train in about a second."""
    raw = {
        "model": {
            "config": {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "max_position_embeddings": 64,
            }
        },
        "tokenizer": {"name_or_path": TOKENIZER},
        "data": {
            "train": {"path": TEXT, "max_examples": 60},
            "pretrain": {"block_size": 16, "token_budget": 512, "validation_fraction": 0.2},
        },
        "trainer": {
            "kind": "hf",
            "num_train_epochs": 1,
            "per_device_train_batch_size": 8,
            "learning_rate": 3e-3,
            "lr_scheduler_type": "cosine",
            "weight_decay": 0.4,
            "save_strategy": "no",
            "eval_strategy": "no",
            "disable_tqdm": True,
            "logging_steps": 1000,
        },
        "regularizers": [{"name": "weight_decay", "no_decay": ["norm", "bias$"]}],
        "output_dir": str(out_dir),
        "seed": 0,
    }
    raw.update(extra)
    return raw


def write(path, raw) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model, a tokenizer or data fails the test."""
    import transformers

    import llmreg.pretrain.data
    import llmreg.recipe.build

    def boom(*args, **kwargs):
        raise AssertionError("loaded a model, a tokenizer or data before the error")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", boom)
        monkeypatch.setattr(cls, "from_config", boom, raising=False)
    for module, name in (
        (llmreg.recipe.build, "build_model"),
        (llmreg.recipe.build, "build_tokenizer"),
        (llmreg.pretrain.data, "pretrain_blocks"),
    ):
        monkeypatch.setattr(module, name, boom)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.pad_token = tok.eos_token
    return tok


# -- data --------------------------------------------------------------------------------------------


def test_pack_keeps_the_budget_in_order_and_drops_the_remainder():
    from llmreg.pretrain.data import pack

    docs = [[1, 10, 11, 2], [1, 12, 2], [1, 13, 14, 15, 2]]
    stream = [t for d in docs for t in d]
    blocks = pack(docs, block_size=3, token_budget=10)
    assert blocks.tolist() == [stream[0:3], stream[3:6], stream[6:9]]  # token 10 of the budget is a partial block
    assert pack(docs, block_size=4).tolist() == [stream[0:4], stream[4:8], stream[8:12]]
    with pytest.raises(ConfigError, match="token_budget: 13 tokens asked, the training text has only 12"):
        pack(docs, 3, 13)


def test_documents_end_with_eos_and_the_last_fraction_is_held_out(tokenizer):
    from llmreg.pretrain.data import hold_out, split_documents, tokenize_documents

    docs = split_documents("one.\n\n\n\ntwo two.\n\nthree.\n\n", "\n\n")
    assert docs == ["one.", "two two.", "three."]
    ids = tokenize_documents(docs, tokenizer)
    assert all(x[0] == tokenizer.bos_token_id and x[-1] == tokenizer.eos_token_id for x in ids)
    train, val = hold_out(ids, 0.34)
    assert train == ids[:2] and val == ids[2:]


def test_build_gives_the_packed_budget_and_labels_equal_ids(tmp_path, tokenizer):
    from llmreg.pretrain.data import collate_blocks, pretrain_blocks, split_documents

    recipe = validate_recipe(tiny_pretrain(tmp_path / "run"))
    train, val = pretrain_blocks(recipe, tokenizer)
    docs = split_documents(open(TEXT).read())[:60]
    held = round(60 * 0.2)
    ids = [tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in docs]
    stream = [t for d in ids[:-held] for t in d][:512]
    assert train.shape == (32, 16) and train.reshape(-1).tolist() == stream
    val_stream = [t for d in ids[-held:] for t in d]
    assert val.reshape(-1).tolist() == val_stream[: len(val_stream) // 16 * 16]
    batch = collate_blocks([{"input_ids": train[0]}, {"input_ids": train[1]}])
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["input_ids"].shape == (2, 16)


def test_recipes_validate_and_round_trip():
    recipe = load_recipe(os.path.join(PRETRAIN, "tiny.yaml"))
    assert recipe.data.pretrain.block_size == 128 and recipe.trainer.args["weight_decay"] == 3.2
    again = validate_recipe(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.pretrain.blok_size=8", "data.pretrain: unknown key 'blok_size'; did you mean 'block_size'?"),
        ("data.train=missing/stories.txt", "data.train: data file not found: missing/stories.txt"),
        ("data.pretrain.token_budget=4", "token_budget: 4 is less than one block"),
        ("data.pretrain.validation_fraction=1.0", "validation_fraction: must be in [0, 1)"),
        ("trainer.kind=sft", "pre-training runs with trainer kind 'hf', not 'sft'"),
        ("trainer.optim=adafactor", "decoupled AdamW weight decay, got 'adafactor'"),
        ("trainer.weight_decay=lots", "trainer.weight_decay: expected float, got 'lots'"),
        ("data.pretrain.synthetic={teachers: [missing/teacher]}", "teachers[0]: no model folder (config.json)"),
    ],
)
def test_bad_pretrain_input_fails_before_anything_loads(nothing_loads, override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(os.path.join(PRETRAIN, "tiny.yaml"), [override])
    assert message in str(err.value)


def test_raw_text_without_pretrain_mode_is_a_plain_text_source(nothing_loads, tmp_path):
    """Without data.pretrain a text file is an ordinary source (one `text` row per paragraph, tokenized row by row,
    not packed into blocks: llmreg.recipe.sources); data.pretrain is what packs it."""
    raw = tiny_pretrain(tmp_path)
    raw["data"] = {"train": TEXT}
    recipe = validate_recipe(raw)
    assert recipe.data.pretrain is None and recipe.data.train.path == os.path.abspath(TEXT)


def test_cluster_recipes_and_every_row_of_the_paper_table_validate():
    table = yaml.safe_load(open(os.path.join(PRETRAIN, "paper_table.yaml")))
    local = [f"data.train={TEXT}", f"data.eval={TEXT}"]  # DCLM files are prepared on the cluster
    checked = 0
    for row in table["rows"]:
        path = os.path.join(PRETRAIN, f"dclm_{row['model']}.yaml")
        for column in ("epoching_only", "regularized", "member"):
            if column not in row:
                continue
            epochs, lr, wd = row[column]
            recipe = load_recipe(
                path,
                [
                    *local,
                    f"data.pretrain.token_budget={table['budgets'][row['tokens']]}",
                    f"trainer.num_train_epochs={epochs}",
                    f"trainer.learning_rate={lr}",
                    f"trainer.weight_decay={wd}",
                ],
            )
            assert recipe.trainer.args["weight_decay"] == wd and recipe.data.pretrain.block_size == 4096
            checked += 1
        if "member" in row:  # the paper's member rule: 2x epochs, 1/2 weight decay, the same lr
            (e, lr, wd), (me, mlr, mwd) = row["regularized"], row["member"]
            assert (me, mlr, mwd) == (2 * e, lr, wd / 2), row
    assert checked == 16 * 2 + 12
    # 64 x 4,096 tokens per step: the budgets are 800 / 1,600 / 3,200 / 6,400 base steps
    assert [b // (64 * 4096) for b in table["budgets"].values()] == [800, 1600, 3200, 6400]
    base = load_recipe(os.path.join(PRETRAIN, "dclm_300m.yaml"), local)
    assert (
        base.trainer.args["num_train_epochs"],
        base.trainer.args["learning_rate"],
        base.trainer.args["weight_decay"],
    ) == tuple(table["rows"][1]["regularized"])


# -- sweep: grid checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid,message",
    [
        (["trainer.weight_decay="], "no values for 'trainer.weight_decay'"),
        (["trainer.weight_decay=0.1,,0.4"], "empty value in the list"),
        (["trainer.weight_decay"], "expected key=v1,v2"),
        (["trainer.weight_decay=0.1", "trainer.weight_decay=0.4"], "given twice"),
        (["output_dir=a,b"], "set by the sweep itself"),
        (["trainer.weight_decay=0.1,0.1"], "a value is repeated"),
    ],
)
def test_parse_grid_refuses_bad_axes(grid, message):
    from llmreg.pretrain.sweep import parse_grid

    with pytest.raises(ConfigError, match=message):
        parse_grid(grid)


@pytest.mark.parametrize(
    "grid,message",
    [
        (["trainer.wieght_decay=0.1,0.4"], "trainer: unknown key 'wieght_decay'; did you mean 'weight_decay'?"),
        (["trainer.weight_decay=0.1,big"], "trainer.weight_decay: expected float, got 'big'"),
        (["trainer.num_train_epochs=4,8", "data.pretrain.blocksize=64"], "did you mean 'block_size'?"),
    ],
)
def test_bad_grid_fails_before_any_model_loads(nothing_loads, tmp_path, grid, message):
    from llmreg.pretrain.sweep import plan_sweep

    with pytest.raises(ConfigError) as err:
        plan_sweep(os.path.join(PRETRAIN, "tiny.yaml"), [], grid, out=str(tmp_path))
    assert message in str(err.value) and str(err.value).startswith("grid point ")


def test_cli_sweep_bad_grid_exits_2(nothing_loads, tmp_path, capsys):
    from llmreg.cli import main

    code = main(
        [
            "sweep",
            os.path.join(PRETRAIN, "tiny.yaml"),
            "--out",
            str(tmp_path),
            "--grid",
            "trainer.weight_decay=0.1,0.4",
            "trainer.num_train_epoch=4,8",
        ]
    )
    assert code == 2
    assert "did you mean 'num_train_epochs'?" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


# -- sweep: certificate ------------------------------------------------------------------------------


def test_certificate_checks_the_axis_neighbours():
    from llmreg.pretrain.sweep import certificate, format_table, summarize

    axes = [("wd", [0.4, 0.1, 1.6]), ("epochs", [4, 8, 16])]  # given unsorted: neighbours follow value order
    # losses[(i, j)] for wd index i (0.4, 0.1, 1.6) and epochs index j
    losses = {
        (1, 0): 3.0,
        (1, 1): 2.9,
        (1, 2): 2.95,
        (0, 0): 2.8,
        (0, 1): 2.5,
        (0, 2): 2.6,
        (2, 0): 2.9,
        (2, 1): 2.7,
        (2, 2): 2.55,
    }
    info = summarize(axes, losses)
    assert info["best"] == (0, 1) and info["certificate"]["certified"]
    assert {(c["axis"], c["value"]) for c in info["certificate"]["neighbours"]} == {
        ("wd", 0.1),
        ("wd", 1.6),
        ("epochs", 4),
        ("epochs", 16),
    }
    assert info["certificate"]["edges"] == []
    # (2, 2) = wd 1.6, 16 epochs: its neighbours (wd 0.4, 16) = 2.6 and (1.6, 8) = 2.7 are worse: a local minimum
    assert sorted(info["local_minima"]) == [(0, 1), (2, 2)]
    assert certificate(axes, losses, (2, 2))["edges"] == [
        {"axis": "wd", "side": "high"},
        {"axis": "epochs", "side": "high"},
    ]
    # a missing neighbour leaves the best unproven; a better one refutes a point
    partial = dict(losses)
    partial[(2, 1)] = None
    cert = certificate(axes, partial, (0, 1))
    assert (
        not cert["certified"] and {"axis": "wd", "value": 1.6, "loss": None, "status": "missing"} in cert["neighbours"]
    )
    assert any(c["status"] == "better" for c in certificate(axes, losses, (1, 1))["neighbours"])
    table = format_table(axes, losses, (0, 1))
    assert table.splitlines()[2].startswith("| 0.1 |") and "**2.5000**" in table.splitlines()[3]


# -- sweep: runs and resume --------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    from llmreg.pretrain.data import pretrain_blocks
    from llmreg.pretrain.ensemble import load_members, validation_loss
    from llmreg.pretrain.sweep import SWEEP_JSON, plan_sweep, run_sweep
    from llmreg.recipe.models import build_tokenizer
    from llmreg.recipe.run import train

    recipe_path = write(tmp_path / "r.yaml", tiny_pretrain(tmp_path / "unused"))
    grid = ["trainer.weight_decay=0.1,1.6", "trainer.num_train_epochs=1,2"]
    out = tmp_path / "sweep"
    calls = []

    def killed_after_two(recipe, overwrite):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the sweep is stopped while the third run starts
        calls.append(recipe.output_dir)
        return train(recipe, overwrite=overwrite)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan_sweep(recipe_path, [], grid, out=str(out)), train_fn=killed_after_two, say=lambda *a: None)
    finished = {d: os.path.getmtime(os.path.join(d, "final_eval.json")) for d in calls}
    partial = json.loads((out / SWEEP_JSON).read_text())
    assert sum(p["eval_loss"] is not None for p in partial["points"]) == 2

    again = []

    def counting(recipe, overwrite):
        again.append(recipe.output_dir)
        return train(recipe, overwrite=overwrite)

    plan = plan_sweep(recipe_path, [], grid, out=str(out))
    summary = run_sweep(plan, train_fn=counting, say=lambda *a: None)
    assert len(again) == 2 and not set(again) & set(calls)
    assert all(os.path.getmtime(os.path.join(d, "final_eval.json")) == t for d, t in finished.items())
    losses = [p["eval_loss"] for p in summary["points"]]
    assert all(isinstance(x, float) and math.isfinite(x) for x in losses)
    assert summary["best"]["eval_loss"] == min(losses)
    # final_eval.json's loss is the loss of the saved final model on the held-out blocks
    point = plan.points[0]
    _, val = pretrain_blocks(point.recipe, build_tokenizer(point.recipe.tokenizer))
    model = load_members([os.path.join(point.run_dir, "final")])[0]
    assert validation_loss(model, val) == pytest.approx(point.result["eval_loss"], rel=1e-5)
    # a third invocation has nothing to do; a different recipe in the same folder is refused
    assert (
        run_sweep(plan_sweep(recipe_path, [], grid, out=str(out)), train_fn=counting, say=lambda *a: None)
        and len(again) == 2
    )
    with pytest.raises(ConfigError, match="holds a run of a different recipe"):
        plan_sweep(recipe_path, ["trainer.learning_rate=1e-3"], grid, out=str(out))


@pytest.mark.slow
def test_data_order_depends_on_the_seed_only(tmp_path):
    from llmreg.recipe import build_run

    def first_batches(seed):
        run = build_run(validate_recipe(tiny_pretrain(tmp_path / f"s{seed}", seed=seed)))
        loader = run.trainer.get_train_dataloader()
        return [b["input_ids"].clone() for _, b in zip(range(2), loader)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# -- fits --------------------------------------------------------------------------------------------


def test_power_law_fit_recovers_parameters_and_keeps_them_non_negative():
    from llmreg.pretrain.fit import fit_power_law

    n = np.array([0.15, 0.3, 0.6, 1.4])
    law = fit_power_law(n, 0.5 / n**1.02 + 3.43)
    assert (law.A, law.alpha, law.E) == pytest.approx((0.5, 1.02, 3.43), rel=1e-4)
    assert law.inverse(3.43 + 0.5) == pytest.approx(1.0, rel=1e-4) and law.inverse(3.0) == math.inf
    k = np.array([1, 2, 3, 4, 5, 8])
    rng = np.random.default_rng(0)
    noisy = 0.3 / k**0.8 + 3.3 + rng.normal(0, 1e-3, len(k))
    law = fit_power_law(k, noisy)
    assert law.E == pytest.approx(3.3, abs=0.02) and law.alpha == pytest.approx(0.8, abs=0.15)
    # data falling towards a negative asymptote: the bound E >= 0 holds and beats any E < 0 fit in the bounds
    law = fit_power_law([1, 2, 4, 8], [1.0, 0.4, 0.1, -0.05])
    assert law.E == 0.0 and law.A >= 0 and law.alpha >= 0
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_power_law([1, 2], [3.0, 2.0])


# -- ensembles ---------------------------------------------------------------------------------------


def _two_members():
    from llmreg.data import tiny_llama

    return [tiny_llama(vocab_size=40, seed=s).eval() for s in (1, 2)]


def test_ensemble_loss_equals_the_hand_computation():
    from llmreg.pretrain.ensemble import EnsembleCausalLM, validation_loss

    members = _two_members()
    blocks = np.random.default_rng(0).integers(0, 40, size=(3, 9))
    ids = torch.tensor(blocks)
    with torch.no_grad():
        z1, z2 = (m(input_ids=ids).logits.double() for m in members)
    targets = ids[:, 1:]
    # logits: softmax of the mean logits, written out
    zbar = (z1 + z2)[:, :-1] / 2
    p = torch.exp(zbar) / torch.exp(zbar).sum(-1, keepdim=True)
    hand_logits = -torch.log(p.gather(-1, targets[..., None])).mean().item()
    # probs: the mixture of the two members' probabilities
    p1 = torch.exp(z1[:, :-1]) / torch.exp(z1[:, :-1]).sum(-1, keepdim=True)
    p2 = torch.exp(z2[:, :-1]) / torch.exp(z2[:, :-1]).sum(-1, keepdim=True)
    mix = (p1 + p2) / 2
    hand_probs = -torch.log(mix.gather(-1, targets[..., None])).mean().item()
    member_losses = [validation_loss(m, blocks, batch_size=2) for m in members]
    assert validation_loss(EnsembleCausalLM(members, "logits"), blocks, batch_size=2) == pytest.approx(
        hand_logits, rel=1e-5
    )
    assert validation_loss(EnsembleCausalLM(members, "probs"), blocks, batch_size=2) == pytest.approx(
        hand_probs, rel=1e-5
    )
    assert hand_logits != pytest.approx(hand_probs, rel=1e-6)
    assert hand_probs <= sum(member_losses) / 2  # a mixture is never worse than the mean member
    single = -torch.log(p1.gather(-1, targets[..., None])).mean().item()
    assert member_losses[0] == pytest.approx(single, rel=1e-5)


def test_ensemble_cli_validation_loss_equals_hand_computation(tmp_path, capsys):
    """`llmreg ensemble M1 M2 --recipe R`: member losses and the K = 1, 2 ensemble losses on R's held-out blocks
    equal the mean next-token CE computed here from the members' logits (mean logits for K = 2)."""
    from transformers import AutoTokenizer

    from llmreg.cli import main
    from llmreg.data import tiny_llama
    from llmreg.pretrain.data import pretrain_blocks

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    paths, models = [], []
    for seed in (1, 2):
        model = tiny_llama(vocab_size=len(tok), seed=seed, max_position_embeddings=64).eval()
        path = tmp_path / f"run{seed}" / "final"  # a run folder: the CLI reads its final/
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(str(path.parent))
        models.append(model)
    recipe = write(tmp_path / "r.yaml", tiny_pretrain(tmp_path / "unused"))
    out = tmp_path / "ens.json"
    assert main(["ensemble", *paths, "--recipe", recipe, "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    _, val = pretrain_blocks(load_recipe(recipe), tok)
    ids = torch.as_tensor(np.asarray(val), dtype=torch.long)

    def ce(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    with torch.no_grad():
        logits = [m(input_ids=ids).logits.float() for m in models]
    assert got["blocks"] == len(val) > 0 and got["K"] == [1, 2]
    assert got["member_losses"] == pytest.approx([ce(z).item() for z in logits], rel=1e-5)
    assert got["ensemble_loss"][0] == pytest.approx(ce(logits[0]).item(), rel=1e-5)
    assert got["ensemble_loss"][1] == pytest.approx(ce((logits[0] + logits[1]) / 2).item(), rel=1e-5)
    assert "K=2" in capsys.readouterr().out


def test_ensemble_cli_errors_before_loading(tmp_path, capsys, nothing_loads):
    from llmreg.cli import main

    assert main(["ensemble", str(tmp_path / "missing"), "--suite", "eval/suites/testbed.yaml"]) == 2
    assert "no model folder" in capsys.readouterr().err
    member = tmp_path / "m"
    member.mkdir()
    (member / "config.json").write_text(json.dumps({"vocab_size": 512}))
    sft_recipe = os.path.join(REPO, "recipes", "quickstart.yaml")  # valid, but no pretrain data mode
    assert main(["ensemble", str(member), "--recipe", sft_recipe]) == 2
    assert "has no data.pretrain" in capsys.readouterr().err


def test_ensemble_refuses_mismatched_members(tmp_path):
    from llmreg.data import tiny_llama
    from llmreg.pretrain.ensemble import EnsembleCausalLM, check_member_paths

    with pytest.raises(ConfigError, match="different vocabularies"):
        EnsembleCausalLM([tiny_llama(vocab_size=40), tiny_llama(vocab_size=41)])
    with pytest.raises(ConfigError, match="unknown value 'mean'"):
        EnsembleCausalLM([tiny_llama(vocab_size=40)], combine="mean")
    with pytest.raises(ConfigError, match="no model folder"):
        check_member_paths([str(tmp_path / "nope")])


@pytest.mark.slow
def test_ensemble_lm_eval_matches_members(tmp_path, tokenizer):
    """lm-eval through the ensemble: two copies of one model score exactly like it; a mixture of two different
    members scores like neither, and no worse than their geometric-mean perplexity (mixture log-loss <= mean)."""
    from llmreg.data import tiny_llama
    from llmreg.eval.run import evaluate_suite
    from llmreg.pretrain.ensemble import evaluate_ensemble_suite

    paths = []
    for seed in (1, 2):
        model = tiny_llama(vocab_size=len(tokenizer), seed=seed, bos_token_id=1, eos_token_id=2)
        path = tmp_path / f"m{seed}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    suite = tmp_path / "suite.yaml"
    suite.write_text("target: [tinystories_ppl]\nretain: [gsm8k_ppl]\n")
    single = evaluate_suite(str(suite), paths[0], limit=3)["tinystories_ppl"]
    same = evaluate_ensemble_suite(str(suite), [paths[0], paths[0]], limit=3)["tinystories_ppl"]
    assert same == pytest.approx(single, rel=1e-5)
    other = evaluate_suite(str(suite), paths[1], limit=3)["tinystories_ppl"]
    mixed = evaluate_ensemble_suite(str(suite), paths, combine="probs", limit=3)["tinystories_ppl"]
    assert math.isfinite(mixed) and mixed != pytest.approx(single, rel=1e-4) and mixed != pytest.approx(other, rel=1e-4)
    assert mixed <= math.sqrt(single * other) * 1.0001  # mixture log-loss <= mean member log-loss


# -- distillation ------------------------------------------------------------------------------------


def test_logit_average_sampling_draws_from_the_mean_logits():
    from llmreg.pretrain.distill import sample_sequences

    members = _two_members()
    got = sample_sequences(members, num=3, length=6, bos_id=1, generator=torch.Generator().manual_seed(5), batch_size=3)
    # the same draws by hand: full forward passes (no cache), softmax of the mean logits, one multinomial per step
    gen = torch.Generator().manual_seed(5)
    seq = torch.full((3, 1), 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(5):
            zbar = sum(m(input_ids=seq).logits[:, -1].float() for m in members) / 2
            seq = torch.cat([seq, torch.multinomial(torch.softmax(zbar, -1), 1, generator=gen)], dim=1)
    assert got == seq.tolist()


def test_pooled_corpus_takes_equal_shares_and_mix_has_the_synthetic_fraction():
    from llmreg.pretrain.distill import generate_corpus, mix_blocks

    rows = generate_corpus(_two_members(), num=5, length=4, bos_id=1, sampling="pooled", seed=0)
    assert [r["teacher"] for r in rows] == [0, 0, 0, 1, 1] and all(
        len(r["ids"]) == 4 and r["ids"][0] == 1 for r in rows
    )
    real = np.arange(12, dtype=np.int32).reshape(6, 2)
    synthetic = [[100, 101], [102, 103], [104, 105], [106, 107]]
    mixed = mix_blocks(real, synthetic, fraction=0.75, seed=0)
    assert mixed.shape == (6 + 18, 2) and mixed[:6].tolist() == real.tolist()
    rest = [tuple(r) for r in mixed[6:].tolist()]
    assert sorted(set(rest)) == [tuple(s) for s in synthetic]  # the pool is cycled, every block used
    assert sorted(rest.count(tuple(s)) for s in synthetic) == [4, 4, 5, 5]


@pytest.mark.slow
def test_distill_recipe_generates_once_and_trains_on_the_mix(tmp_path, tokenizer, monkeypatch):
    from llmreg.data import tiny_llama
    from llmreg.pretrain import distill
    from llmreg.recipe import build_run

    teachers = []
    for seed in (1, 2):
        path = tmp_path / f"teacher{seed}"
        tiny_llama(vocab_size=len(tokenizer), seed=seed).save_pretrained(path)
        teachers.append(str(path))
    with pytest.raises(ConfigError, match="train the teacher first"):
        load_recipe(os.path.join(PRETRAIN, "distill.yaml"), [f"data.pretrain.synthetic.teachers=[{tmp_path}/none]"])
    small = [
        "model.config.hidden_size=16",
        "model.config.intermediate_size=32",
        "model.config.num_hidden_layers=1",
        "model.config.num_attention_heads=2",
        "model.config.num_key_value_heads=2",
        "data.pretrain.block_size=16",
        "data.pretrain.token_budget=256",
        f"data.train={{path: {TEXT}, max_examples: 40}}",
        "data.pretrain.synthetic.num_sequences=10",
        f"data.pretrain.synthetic.teachers=[{teachers[0]}, {teachers[1]}]",
        f"output_dir={tmp_path / 'student'}",
        "trainer.num_train_epochs=1",
        "trainer.disable_tqdm=true",
    ]
    recipe = load_recipe(os.path.join(PRETRAIN, "distill.yaml"), small)
    run = build_run(recipe)
    assert len(run.trainer.train_dataset) == 16 + 48  # 16 real blocks, 0.75 / 0.25 x 16 synthetic
    meta = json.loads((tmp_path / "student" / "synthetic" / "meta.json").read_text())
    assert meta["sampling"] == "pooled" and meta["temperature"] == 1.0 and meta["top_k"] is None
    lines = (tmp_path / "student" / "synthetic" / "sequences.jsonl").read_text().splitlines()
    assert len(lines) == 10 and {json.loads(x)["teacher"] for x in lines} == {0, 1}

    def no_teachers(*a, **k):
        raise AssertionError("the cached corpus should be reused")

    monkeypatch.setattr(distill, "_load_teachers", no_teachers)
    rerun = build_run(load_recipe(os.path.join(PRETRAIN, "distill.yaml"), small))
    assert rerun.trainer.train_dataset["input_ids"] == run.trainer.train_dataset["input_ids"]
    rerun.trainer.train()
    assert rerun.trainer.state.global_step == 64 // 16


def test_joint_asymptote_and_data_efficiency():
    from llmreg.pretrain.fit import PowerLaw, data_efficiency, joint_asymptote

    k = np.array([1, 2, 3, 4, 6])
    sizes = {0.15: 3.6, 0.3: 3.45, 0.6: 3.37, 1.4: 3.31}
    e_star = 3.17
    # E_N built from a size law with asymptote 3.17, then each ensemble curve approaches its E_N
    e_n = {n: 0.05 / n**1.0 + e_star for n in sizes}
    data = {n: (k, 0.2 / k**0.9 + e_n[n]) for n in sizes}
    out = joint_asymptote(data)
    assert out["E_star"] == pytest.approx(e_star, rel=1e-3)
    assert [out["per_size"][n]["E"] for n in sorted(sizes)] == pytest.approx([e_n[n] for n in sorted(sizes)], rel=1e-4)
    law = PowerLaw(A=2.0, alpha=0.25, E=1.9, rss=0.0)
    d0 = 200.0
    reached = float(law(5.17 * d0))  # the loss the baseline reaches with 5.17x the data
    assert data_efficiency(law, reached, d0) == pytest.approx(5.17, rel=1e-6)
    assert data_efficiency(law, 1.8, d0) == math.inf
