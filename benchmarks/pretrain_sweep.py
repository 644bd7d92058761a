"""Data-constrained pre-training on CPU (arXiv 2509.14786 at toy scale): weight decay x epochs, ensembles, sizes.

    python benchmarks/pretrain_sweep.py                              # the real run (about 30 min on a busy CPU)
    python benchmarks/pretrain_sweep.py --smoke --out /tmp/ps        # tiny and fast (CI): never writes benchmarks/
    python benchmarks/pretrain_sweep.py --variants multipliers --merge   # add a variant to the existing results

Setup: recipes/pretrain/tiny.yaml (a ~1M-parameter Llama, the stories260K 512-token vocabulary, blocks of 128
tokens, lr 3e-3, cosine to 0, decoupled AdamW, 2-D weights decay) on a fixed budget of TinyStories tokens
(--budget, default 24,576 = 192 blocks) repeated for E epochs; the validation loss is on the last 10% of the
stories (held out, the same for every run). Per variant:

1. grid: weight decay x epochs (`llmreg sweep` machinery: resumable, neighbour check), lr fixed;
2. ensembles: K members (seeds 0..K-1, initialisation and data order) with the paper's member rule
   (2x the best grid point's epochs, half its weight decay) and with the tuned point's own configuration
   (member 0 is the grid's best run); validation loss of the first k members for k = 1..K under logit
   averaging (and probability averaging), and the fit L(K) = A / K^beta + E;
3. sizes: the best grid point's (epochs, wd) at other widths (--sizes), and the fit L(N) = A / N^alpha + E.

Variants: `VARIANTS` maps a name to extra recipe overrides; `multipliers` appends the `multipliers`
regularizer (merged later from another branch: the run refuses it, before training anything, while it is not
registered). `--variants NAME --merge` adds or replaces that variant in the existing pretrain_sweep.json
(same budget, grid and model: checked) and redraws the figures and the RESULTS.md section.

Outputs (in --out, default benchmarks/): pretrain_sweep.json; figures/pretrain_sweep_wd.png (validation loss
vs weight decay, one line per epochs value), figures/pretrain_sweep_ensemble.png (loss vs K with the fit),
figures/pretrain_sweep_sizes.png (loss vs parameters with the fit); the section between the markers below in
RESULTS.md. Runs go to --workdir (default runs/pretrain_sweep; with --smoke <out>/work) and are reused when
the benchmark is started again (a killed run continues).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "pretrain" / "tiny.yaml"
TEXT = REPO.parent / "shared" / "data" / "tinystories" / "tinystories_validation_first1000.txt"
BEGIN, END = "<!-- pretrain_sweep:begin -->", "<!-- pretrain_sweep:end -->"
JSON_NAME = "pretrain_sweep.json"

# name -> extra `key=value` overrides of the recipe (a regularizer is appended after weight_decay, index 1)
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "multipliers": ["regularizers.1={name: multipliers}"],
}

DEFAULTS = dict(
    wd=[0.1, 0.4, 1.6, 3.2],
    epochs=[4, 8, 16],
    budget=24576,
    ensemble=4,
    sizes=[64, 96, 160],
    member_rules=["paper", "tuned"],
)
SMOKE = dict(wd=[0.1, 1.6], epochs=[1, 2], budget=1024, ensemble=2, sizes=[16, 24], member_rules=["paper", "tuned"])
SMOKE_OVERRIDES = [
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=2",
    "data.pretrain.block_size=32",
    f"data.train={{path: {TEXT}, max_examples: 120}}",
    "data.pretrain.validation_fraction=0.25",
    "trainer.per_device_train_batch_size=8",
    "trainer.logging_steps=1000",
]


def log(line: str) -> None:
    print(line, flush=True)


def _quiet() -> list[str]:
    return ["trainer.disable_tqdm=true"]


def check_variants(names: list[str], base_overrides: list[str]) -> None:
    """Every variant's recipe validates (an unregistered regularizer is refused here, before any run)."""
    from llmreg.core.options import ConfigError, closest
    from llmreg.recipe import load_recipe

    for name in names:
        if name not in VARIANTS:
            hint = closest(name, VARIANTS)
            raise SystemExit(
                f"unknown variant {name!r}"
                + (f"; did you mean {hint!r}?" if hint else "")
                + f" (variants: {', '.join(VARIANTS)})"
            )
        try:
            load_recipe(str(RECIPE), [*base_overrides, *VARIANTS[name]])
        except ConfigError as err:
            raise SystemExit(f"variant {name!r}: {err}") from None


def sweep(overrides: list[str], grid: list[str], out: Path) -> dict:
    from llmreg.pretrain.sweep import plan_sweep, run_sweep

    plan = plan_sweep(str(RECIPE), overrides, grid, out=str(out))
    return run_sweep(plan, say=log)


def param_count(recipe) -> int:
    from transformers import AutoModelForCausalLM

    from llmreg.recipe.models import build_tokenizer, model_config

    config = model_config(recipe.model, build_tokenizer(recipe.tokenizer))
    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def run_variant(name: str, cfg: dict, base: list[str], workdir: Path) -> dict:
    from llmreg.pretrain.data import pretrain_blocks
    from llmreg.pretrain.fit import fit_power_law
    from llmreg.recipe import load_recipe
    from llmreg.recipe.models import build_tokenizer

    overrides = [*base, *VARIANTS[name]]
    t0 = time.time()
    log(f"== variant {name}: grid")
    grid = sweep(
        overrides,
        [
            f"trainer.weight_decay={','.join(map(str, cfg['wd']))}",
            f"trainer.num_train_epochs={','.join(map(str, cfg['epochs']))}",
        ],
        workdir / name / "grid",
    )
    best = grid["best"]["values"]
    best_wd, best_epochs = best["trainer.weight_decay"], best["trainer.num_train_epochs"]
    std = [p for p in grid["points"] if p["values"]["trainer.weight_decay"] == min(cfg["wd"])]
    std_best = min(std, key=lambda p: p["eval_loss"])

    recipe = load_recipe(str(RECIPE), overrides)
    _, val = pretrain_blocks(recipe, build_tokenizer(recipe.tokenizer))
    ensembles = {}
    for rule in cfg["member_rules"]:
        if rule == "paper":  # 2x the tuned epochs, half its weight decay (ensemble_members.py)
            member_epochs, member_wd = best_epochs * 2, best_wd / 2
        else:  # "tuned": the tuned single model's own (epochs, wd); member 0 is the grid's best run itself
            member_epochs, member_wd = best_epochs, best_wd
        log(f"== variant {name}: ensemble members, {rule} rule (epochs {member_epochs}, wd {member_wd})")
        seeds = list(range(cfg["ensemble"])) if rule == "paper" else list(range(1, cfg["ensemble"]))
        members = sweep(
            [*overrides, f"trainer.weight_decay={member_wd}", f"trainer.num_train_epochs={member_epochs}"],
            [f"seed={','.join(map(str, seeds))}"],
            workdir / name / ("members" if rule == "paper" else f"members_{rule}"),
        )
        points = members["points"]
        if rule == "tuned":
            points = [next(p for p in grid["points"] if p["values"] == best), *points]
        ensembles[rule] = evaluate_ensemble(points, val, member_epochs, member_wd)

    log(f"== variant {name}: sizes")
    sizes = {"hidden": [], "params": [], "eval_loss": []}
    base_hidden = recipe.model.config["hidden_size"]
    base_ratio = recipe.model.config["intermediate_size"] / base_hidden
    for hidden in sorted({*cfg["sizes"], base_hidden}):
        if hidden == base_hidden:  # the grid's best point is this size
            loss = grid["best"]["eval_loss"]
            size_recipe = recipe
        else:
            size_overrides = [
                *overrides,
                f"trainer.weight_decay={best_wd}",
                f"trainer.num_train_epochs={best_epochs}",
                f"model.config.intermediate_size={int(round(hidden * base_ratio))}",
            ]
            res = sweep(size_overrides, [f"model.config.hidden_size={hidden}"], workdir / name / "sizes")
            loss = res["points"][0]["eval_loss"]
            size_recipe = load_recipe(str(RECIPE), [*size_overrides, f"model.config.hidden_size={hidden}"])
        sizes["hidden"].append(hidden)
        sizes["params"].append(param_count(size_recipe))
        sizes["eval_loss"].append(loss)
    if len(sizes["params"]) >= 3:
        sizes["fit"] = fit_power_law([n / 1e6 for n in sizes["params"]], sizes["eval_loss"]).as_dict()
        sizes["fit"]["N_unit"] = "millions of parameters"
    return {
        "overrides": VARIANTS[name],
        "grid": {k: grid[k] for k in ("axes", "points", "best", "certificate", "local_minima", "table")},
        "best": {"weight_decay": best_wd, "epochs": best_epochs, "eval_loss": grid["best"]["eval_loss"]},
        "standard_wd_best": {
            "weight_decay": std_best["values"]["trainer.weight_decay"],
            "epochs": std_best["values"]["trainer.num_train_epochs"],
            "eval_loss": std_best["eval_loss"],
        },
        "ensembles": ensembles,
        "sizes": sizes,
        "seconds": round(time.time() - t0, 1),
    }


def evaluate_ensemble(points: list[dict], val, member_epochs, member_wd) -> dict:
    """Validation loss of the first k members, k = 1..K, under both combination rules; the L(K) fit."""
    from llmreg.pretrain.ensemble import EnsembleCausalLM, load_members, validation_loss
    from llmreg.pretrain.fit import fit_power_law

    models = load_members([os.path.join(p["run_dir"], "final") for p in points])
    ens = {
        "member_epochs": member_epochs,
        "member_weight_decay": member_wd,
        "member_losses": [p["eval_loss"] for p in points],
        "K": [],
        "logits": [],
        "probs": [],
    }
    for k in range(1, len(models) + 1):
        ens["K"].append(k)
        for combine in ("logits", "probs"):
            ens[combine].append(validation_loss(EnsembleCausalLM(models[:k], combine), val))
        log(f"    K={k}: logits {ens['logits'][-1]:.4f}, probs {ens['probs'][-1]:.4f}")
    if len(models) >= 3:
        ens["fit_logits"] = fit_power_law(ens["K"], ens["logits"]).as_dict()
    return ens


# -- outputs -----------------------------------------------------------------------------------------


def write_figures(results: dict, figures: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    paths = []
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v, (name, res) in enumerate(results["variants"].items()):
        by_epochs: dict[Any, list] = {}
        for p in res["grid"]["points"]:
            by_epochs.setdefault(p["values"]["trainer.num_train_epochs"], []).append(
                (p["values"]["trainer.weight_decay"], p["eval_loss"])
            )
        for e, pts in sorted(by_epochs.items()):
            pts.sort()
            ax.plot([w for w, _ in pts], [l for _, l in pts], styles[v % 4], marker="o", label=f"{name}, {e:g} epochs")
    ax.set_xscale("log")
    ax.set_xlabel("weight decay (decoupled AdamW, x lr)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(f"{results['budget_tokens']} tokens repeated")
    ax.legend(fontsize=7)
    paths.append(figures / "pretrain_sweep_wd.png")
    fig.tight_layout(), fig.savefig(paths[-1], dpi=120), plt.close(fig)

    for key, fname, xlabel in (
        ("ensembles", "pretrain_sweep_ensemble.png", "ensemble size K"),
        ("sizes", "pretrain_sweep_sizes.png", "parameters (millions)"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, res in results["variants"].items():
            curves = []
            if key == "ensembles":
                for rule, ens in res["ensembles"].items():
                    label = f"{name}, {rule} members ({ens['member_epochs']} ep, wd {ens['member_weight_decay']:g})"
                    ax.plot(ens["K"], ens["probs"], "x:", label=f"{label}, prob. avg")
                    curves.append((ens["K"], ens["logits"], ens.get("fit_logits"), f"{label}, logit avg"))
            else:
                curves.append(
                    (
                        [n / 1e6 for n in res["sizes"]["params"]],
                        res["sizes"]["eval_loss"],
                        res["sizes"].get("fit"),
                        name,
                    )
                )
            for x, y, fit, label in curves:
                ax.plot(x, y, "o", label=label)
                if fit:
                    xs = [min(x) * (max(x) / min(x)) ** (i / 50) for i in range(51)]
                    ax.plot(
                        xs,
                        [fit["A"] / t ** fit["alpha"] + fit["E"] for t in xs],
                        "-",
                        alpha=0.6,
                        label=f"fit: E = {fit['E']:.3f}, exponent {fit['alpha']:.2f}",
                    )
            ax.axhline(res["best"]["eval_loss"], color="gray", linewidth=0.6, label=f"{name}, tuned single model")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=6)
        paths.append(figures / fname)
        fig.tight_layout(), fig.savefig(paths[-1], dpi=120), plt.close(fig)
    return paths


def markdown_section(results: dict, figures_rel: str) -> str:
    lines = [
        BEGIN,
        "## Data-constrained pre-training: weight decay, epochs, ensembles (arXiv 2509.14786)",
        "",
        f"`{results['command']}` on {results['machine']}; {results['total_seconds'] / 60:.0f} min in all.",
        f"Model: Llama, {_model_text(results['model'])}, {results['params'] / 1e6:.2f}M parameters; seed set "
        f"{results['budget_tokens']} TinyStories tokens (blocks of {results['block_size']}), repeated E epochs; "
        f"validation: {results['eval_tokens']} held-out tokens; lr {results['learning_rate']}, cosine to 0, "
        "decoupled AdamW (decay x scheduled lr, torch semantics), 2-D weights decay. One seed per grid point.",
        "",
    ]
    for name, res in results["variants"].items():
        b, s = res["best"], res["standard_wd_best"]
        lines += [
            f"### {name}",
            "",
            "Final validation loss, weight decay (rows) x epochs (columns); best in bold:",
            "",
            res["grid"]["table"],
            "",
        ]
        cert = res["grid"]["certificate"]
        ratio = b["weight_decay"] / s["weight_decay"]
        lines.append(
            f"- Best: wd {b['weight_decay']}, {b['epochs']} epochs, loss {b['eval_loss']:.4f}; neighbour "
            f"check {'passed' if cert['certified'] else 'NOT passed'}"
            + (
                f" (at the grid's edge on {', '.join(e['axis'] + ' ' + e['side'] for e in cert['edges'])})"
                if cert["edges"]
                else ""
            )
            + "."
        )
        lines.append(
            f"- Best at the standard wd {s['weight_decay']}: {s['epochs']} epochs, loss {s['eval_loss']:.4f}. "
            f"The best wd is {ratio:g}x the standard one and gains {s['eval_loss'] - b['eval_loss']:.4f} "
            "nats; "
            + (
                "well above 0.1, as the paper reports (0.8-3.2 at 200M tokens)."
                if ratio >= 4
                else "not well above 0.1 at this scale (the paper: 0.8-3.2 at 200M tokens)."
            )
        )
        for rule, ens in res["ensembles"].items():
            ks = ", ".join(f"K={k}: {l:.4f}" for k, l in zip(ens["K"], ens["logits"]))
            lines.append(
                f"- Ensemble, {rule} member rule ({ens['member_epochs']} epochs, wd {ens['member_weight_decay']:g}, "
                f"seeds 0..{len(ens['K']) - 1}; logit averaging): {ks}. Gain (loss decrease) over the tuned single "
                f"model ({b['eval_loss']:.4f}, the same {results['budget_tokens']} tokens): "
                + ", ".join(f"K={k} {b['eval_loss'] - l:+.4f}" for k, l in zip(ens["K"], ens["logits"]) if k > 1)
                + f"; over one member (K=1): K={ens['K'][-1]} {ens['logits'][0] - ens['logits'][-1]:+.4f}"
                + f"; over the standard-wd best: K={ens['K'][-1]} {s['eval_loss'] - ens['logits'][-1]:+.4f}. "
                "Probability averaging: "
                + ", ".join(f"K={k} {l:.4f}" for k, l in zip(ens["K"], ens["probs"]))
                + "."
                + (
                    f" Fit L(K) = A/K^b + E: E = {ens['fit_logits']['E']:.4f} (A {ens['fit_logits']['A']:.4f}, "
                    f"b {ens['fit_logits']['alpha']:.2f}), the K -> infinity asymptote"
                    + (" (b at the fit's bound: not a power law)." if ens["fit_logits"]["alpha"] >= 4.99 else ".")
                    if ens.get("fit_logits")
                    else ""
                )
            )
        sz = res["sizes"]
        lines.append(
            "- Sizes at the 1M model's best (epochs, wd), not retuned per size as in the paper: "
            + ", ".join(f"{n / 1e6:.2f}M: {l:.4f}" for n, l in zip(sz["params"], sz["eval_loss"]))
            + (
                f"; fit L(N) = A/N^a + E (N in millions): E = {sz['fit']['E']:.4f}, a = {sz['fit']['alpha']:.2f}"
                + (
                    " (a at the fit's bound 5: the points are not a power law, so E means nothing here)"
                    if sz["fit"]["alpha"] >= 4.99
                    else ""
                )
                if sz.get("fit")
                else ""
            )
            + "."
        )
        lines.append("")
    lines += [
        f"![validation loss vs weight decay]({figures_rel}/pretrain_sweep_wd.png) "
        f"![ensembles]({figures_rel}/pretrain_sweep_ensemble.png) "
        f"![sizes]({figures_rel}/pretrain_sweep_sizes.png)",
        "",
        "Caveats: toy scale (about 1M parameters, tens of thousands of tokens; the paper: 150M-1.4B parameters, "
        "200M tokens); lr fixed at 3e-3 (the paper tunes it jointly); one seed per grid point, so differences "
        "of a few hundredths are within seed noise; the four-point size fit has three parameters.",
        END,
    ]
    return "\n".join(lines)


def _model_text(config: dict) -> str:
    keys = (
        ("hidden_size", "hidden"),
        ("intermediate_size", "MLP"),
        ("num_hidden_layers", "layers"),
        ("num_attention_heads", "heads"),
    )
    return ", ".join(f"{label} {config[k]}" for k, label in keys if k in config) + ", vocabulary 512 (stories260K)"


def merge_results(old: dict, new: dict) -> dict:
    for key in ("budget_tokens", "grid", "model", "block_size", "learning_rate"):
        if old.get(key) != new.get(key):
            raise SystemExit(
                f"--merge: the existing results differ in {key!r} ({old.get(key)!r} vs {new.get(key)!r}); "
                "rerun every variant instead"
            )
    merged = json.loads(json.dumps(old))
    merged["variants"].update(new["variants"])
    merged["command"] = f"{old.get('command', '?')}; then {new['command']}"
    merged["total_seconds"] = round(old.get("total_seconds", 0.0) + new["total_seconds"], 1)
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--variants",
        nargs="+",
        default=["baseline"],
        metavar="NAME",
        help=f"variants to run (of {', '.join(VARIANTS)}; default baseline)",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny model and budget, 2x2 grid (CI); needs --out")
    p.add_argument("--out", help="folder for the json, figures/ and RESULTS.md (default: benchmarks/)")
    p.add_argument("--workdir", help="folder for the runs (default runs/pretrain_sweep; with --smoke <out>/work)")
    p.add_argument("--merge", action="store_true", help="add or replace these variants in the existing json")
    p.add_argument("--wd", type=float, nargs="+", help="weight decays of the grid")
    p.add_argument("--epochs", type=int, nargs="+", help="epochs of the grid")
    p.add_argument("--budget", type=int, help="training tokens of the seed set")
    p.add_argument("--ensemble", type=int, help="ensemble members K")
    p.add_argument("--sizes", type=int, nargs="+", help="other hidden sizes for the L(N) fit")
    p.add_argument(
        "--member-rules",
        nargs="+",
        choices=["paper", "tuned"],
        dest="member_rules",
        help="ensemble member configurations: paper (2x epochs, 1/2 wd of the tuned model) and/or tuned "
        "(the tuned model's own; member 0 is the grid's best run)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        if not args.out:
            p.error("--smoke needs --out DIR (it must not overwrite the real results in benchmarks/)")
        if Path(args.out).resolve().is_relative_to((REPO / "benchmarks").resolve()):
            p.error("--smoke must not write into benchmarks/")
    cfg = dict(SMOKE if args.smoke else DEFAULTS)
    for key in cfg:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    out = Path(args.out) if args.out else REPO / "benchmarks"
    workdir = Path(args.workdir) if args.workdir else (out / "work" if args.smoke else REPO / "runs" / "pretrain_sweep")
    base = [*(SMOKE_OVERRIDES if args.smoke else []), f"data.pretrain.token_budget={cfg['budget']}", *_quiet()]
    check_variants(args.variants, base)  # before any training

    import torch

    from llmreg.pretrain.data import pretrain_blocks
    from llmreg.recipe import load_recipe
    from llmreg.recipe.models import build_tokenizer

    recipe = load_recipe(str(RECIPE), base)
    _, val = pretrain_blocks(recipe, build_tokenizer(recipe.tokenizer))
    t0 = time.time()
    results: dict[str, Any] = {
        "command": " ".join(["python benchmarks/pretrain_sweep.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load {os.getloadavg()[0]:.2f} at start",
        "model": {k: v for k, v in recipe.model.config.items()},
        "params": param_count(recipe),
        "budget_tokens": cfg["budget"],
        "block_size": recipe.data.pretrain.block_size,
        "eval_tokens": len(val) * recipe.data.pretrain.block_size,
        "learning_rate": recipe.trainer.args["learning_rate"],
        "grid": {"weight_decay": cfg["wd"], "epochs": cfg["epochs"]},
        "variants": {},
    }
    for name in args.variants:
        results["variants"][name] = run_variant(name, cfg, base, workdir)
    results["total_seconds"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge and (out / JSON_NAME).is_file():
        results = merge_results(json.loads((out / JSON_NAME).read_text()), results)
    (out / JSON_NAME).write_text(json.dumps(results, indent=2))
    figures = write_figures(results, out / "figures")
    from llmreg.eval.run import replace_marked_section

    replace_marked_section(out / "RESULTS.md", markdown_section(results, "figures"), BEGIN, END)
    log(f"wrote {out / JSON_NAME}, {out / 'RESULTS.md'}, {', '.join(str(f) for f in figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
