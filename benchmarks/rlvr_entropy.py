"""RLVR on CPU: GRPO vs GRPO + entropy bonus vs GRPO + Lp-Reg, policy entropy and reward over steps.

    python benchmarks/rlvr_entropy.py [--steps 60] [--seeds 0 1] [--smoke] [--workdir DIR]

Runs `recipes/rlvr/{grpo,grpo_entropy,lp_reg}.yaml` (the testbed model on its `add` skill, exact-answer reward)
for the same steps and seeds, logging every step, then scores each final model on 200 held-out `add` prompts:
greedy exact match, and mean@8 / pass@8 when sampling at T = 1. The entropy bonus is TRL's own
`GRPOConfig.entropy_coef` (trl 1.16 has it: loss - coef * mean token entropy of the micro-batch).
Writes `benchmarks/rlvr_entropy.json`, `benchmarks/figures/rlvr_entropy.png` and the section of
benchmarks/RESULTS.md between its markers. `--smoke` swaps in a tiny testbed build and 2 steps, writes only to
the work directory (default a temporary one) and never to benchmarks/ (CI runs it so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- rlvr_entropy:begin -->", "<!-- rlvr_entropy:end -->"
METHODS = ("grpo", "grpo_entropy", "lp_reg")
SMOKE = [
    "model.testbed={size: tiny, steps: 20, skills: [add]}",
    "data.num_examples=64",
    "trainer.per_device_train_batch_size=16",
]
EVAL_N = 200
SAMPLES = 8


def run(method: str, seed: int, steps: int, extra: list[str], workdir: Path) -> dict:
    from llmreg.recipe.loader import load_recipe
    from llmreg.recipe.run import train

    out = workdir / f"{method}_seed{seed}"
    recipe = load_recipe(
        str(REPO / "recipes" / "rlvr" / f"{method}.yaml"),
        [
            f"seed={seed}",
            f"data.seed={seed + 3}",
            f"trainer.max_steps={steps}",
            "trainer.logging_steps=1",
            f"output_dir={out}",
            *extra,
        ],
    )
    start = time.perf_counter()
    result = train(recipe, overwrite=True)
    seconds = time.perf_counter() - start
    logs = [h for h in result.trainer.state.log_history if "reward" in h]
    curve = {
        key: [h.get(key) for h in logs]
        for key in ("reward", "entropy", "reg/lp_reg/selected_share", "reg/lp_reg/threshold_prob", "reg/lp_reg/penalty")
    }
    scores = evaluate(result.trainer.model, result.trainer.processing_class, n=EVAL_N if steps > 2 else 8)
    return {"steps": [h["step"] for h in logs], **curve, **scores, "seconds": round(seconds, 1)}


def evaluate(model, tok, n: int) -> dict:
    """Greedy exact match, and mean@k / pass@k sampled at T = 1, on `n` held-out `add` prompts."""
    import torch

    from llmreg.testbed import exact_match, make_examples

    examples = make_examples("add", n, seed=0, split="eval")
    greedy = exact_match(model, tok, examples)
    newline = tok.convert_tokens_to_ids("\n")
    model.eval()
    torch.manual_seed(1234)
    tok.padding_side = "left"
    enc = tok([p for p, _ in examples], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=4,
            num_return_sequences=SAMPLES,
            eos_token_id=[newline, tok.eos_token_id],
            pad_token_id=tok.pad_token_id,
        )
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    hits = [t.split("\n", 1)[0] == examples[i // SAMPLES][1] for i, t in enumerate(texts)]
    per_prompt = [hits[i * SAMPLES : (i + 1) * SAMPLES] for i in range(n)]
    return {
        "greedy": greedy,
        f"mean@{SAMPLES}": sum(hits) / len(hits),
        f"pass@{SAMPLES}": sum(any(h) for h in per_prompt) / n,
    }


def _mean(values: list, lo: int, hi: int | None) -> float:
    part = [v for v in values[lo:hi] if v is not None]
    return sum(part) / len(part) if part else math.nan


def summary(runs: list[dict]) -> dict:
    def avg(key, lo=0, hi=None):
        return sum(_mean(r[key], lo, hi) for r in runs) / len(runs)

    tail = max(1, len(runs[0]["steps"]) // 5)
    return {
        "entropy_first": avg("entropy", 0, tail),
        "entropy_last": avg("entropy", -tail),
        "entropy_min": sum(min(v for v in r["entropy"] if v is not None) for r in runs) / len(runs),
        "reward_first": avg("reward", 0, tail),
        "reward_last": avg("reward", -tail),
        "greedy": sum(r["greedy"] for r in runs) / len(runs),
        f"mean@{SAMPLES}": sum(r[f"mean@{SAMPLES}"] for r in runs) / len(runs),
        f"pass@{SAMPLES}": sum(r[f"pass@{SAMPLES}"] for r in runs) / len(runs),
        "selected_share": avg("reg/lp_reg/selected_share")
        if runs[0]["reg/lp_reg/selected_share"][0] is not None
        else None,
        "seconds": sum(r["seconds"] for r in runs),
        "tail_steps": tail,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"grpo": "tab:blue", "grpo_entropy": "tab:orange", "lp_reg": "tab:green"}
    for method, runs in results["runs"].items():
        for key, ax in (("entropy", axes[0]), ("reward", axes[1])):
            for i, r in enumerate(runs):
                ax.plot(
                    r["steps"],
                    _smooth(r[key]),
                    color=colors[method],
                    alpha=0.9 if i == 0 else 0.45,
                    label=method if i == 0 else None,
                )
    axes[0].set_title("policy entropy (nats/token, TRL's)")
    axes[1].set_title("reward = sampled accuracy on the training prompts")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend()
    fig.suptitle(
        f"RLVR on the testbed's add skill: {results['config']['steps']} steps, seeds "
        f"{results['config']['seeds']} (lines: seeds, moving average of 5)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: list, k: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - k + 1) : i + 1] if v is not None]
        out.append(sum(part) / len(part) if part else math.nan)
    return out


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        BEGIN,
        "",
        "### RLVR entropy: GRPO vs entropy bonus vs Lp-Reg (generated by benchmarks/rlvr_entropy.py)",
        "",
        f"Recipes `recipes/rlvr/{{grpo,grpo_entropy,lp_reg}}.yaml`: the testbed model (2.68M parameters) on "
        f"its `add` skill with the exact-answer reward, {cfg['steps']} GRPO steps of {cfg['batch']} completions "
        f"(groups of 8), seeds {cfg['seeds']}, lr {cfg['lr']}; ratio clip [0, 10], no reference KL, dapo "
        "loss. Entropy and reward: TRL's per-step logs (mean over the first / last "
        f"{results['summary']['lp_reg']['tail_steps']} steps, averaged over seeds). Held-out: 200 `add` prompts "
        "never trained on; greedy exact match, and mean@8 / pass@8 sampling at T = 1. s: wall time of all seeds "
        f"on the shared 2-core machine. Figure: `benchmarks/figures/rlvr_entropy.png`.",
        "",
        "| method | entropy first | entropy last | entropy min | reward first | reward last | held-out greedy "
        "| mean@8 | pass@8 | regularised share | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, s in results["summary"].items():
        share = "–" if s["selected_share"] is None else f"{s['selected_share']:.4f}"
        lines.append(
            f"| {method} | {s['entropy_first']:.3f} | {s['entropy_last']:.3f} | {s['entropy_min']:.3f} | "
            f"{s['reward_first']:.3f} | {s['reward_last']:.3f} | {s['greedy']:.3f} | {s['mean@8']:.3f} | "
            f"{s['pass@8']:.3f} | {share} | {s['seconds']:.0f} |"
        )
    if results.get("note"):
        lines += ["", results["note"]]
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lr", type=float, default=None, help="override the recipes' learning rate")
    p.add_argument("--batch", type=int, default=None, help="completions per step (a multiple of 8)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--note", default="", help="a paragraph appended under the table")
    p.add_argument("--smoke", action="store_true", help="tiny build, 2 steps, one seed; writes only to --workdir")
    p.add_argument("--workdir", default=None, help="runs (and with --smoke the outputs); default runs/rlvr_entropy")
    a = p.parse_args(argv)
    if a.smoke:
        workdir = Path(a.workdir or tempfile.mkdtemp(prefix="rlvr_entropy_"))
        a.steps, a.seeds = 2, a.seeds[:1]
    else:
        workdir = Path(a.workdir or REPO / "runs" / "rlvr_entropy")
    extra = list(SMOKE if a.smoke else [])
    if a.lr is not None:
        extra.append(f"trainer.learning_rate={a.lr}")
    if a.batch is not None:
        extra.append(f"trainer.per_device_train_batch_size={a.batch}")
    from llmreg.recipe.loader import load_recipe

    base = load_recipe(str(REPO / "recipes" / "rlvr" / "grpo.yaml"), extra)
    results = {
        "config": {
            "steps": a.steps,
            "seeds": a.seeds,
            "lr": base.trainer.args["learning_rate"],
            "batch": base.trainer.args["per_device_train_batch_size"],
            "smoke": a.smoke,
        },
        "runs": {},
        "summary": {},
        "note": a.note,
    }
    for method in a.methods:
        results["runs"][method] = [run(method, seed, a.steps, extra, workdir) for seed in a.seeds]
        results["summary"][method] = summary(results["runs"][method])
    out_dir = workdir if a.smoke else REPO / "benchmarks"
    (out_dir / "rlvr_entropy.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, (workdir if a.smoke else REPO / "benchmarks" / "figures") / "rlvr_entropy.png")
    section = markdown(results)
    print(section)
    if not a.smoke:
        from llmreg.eval.run import replace_marked_section

        replace_marked_section(RESULTS, section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
