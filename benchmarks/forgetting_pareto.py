"""Gain on the new task vs forgetting of the old ones, per fine-tuning method, on two setups.

    python benchmarks/forgetting_pareto.py [--methods vanilla l2_sp] [--steps N]
    python benchmarks/forgetting_pareto.py --smoke --out /tmp/fp     # tiny and fast (CI): never writes benchmarks/
    python benchmarks/forgetting_pareto.py --methods lfu --merge     # add/replace methods in the existing results
    python benchmarks/forgetting_pareto.py --replot                  # figures + RESULTS.md from the saved json only

Setups (each a recipe, trained through `llmreg.recipe`, and a suite, scored through `llmreg.eval`):

- `testbed`: recipes/testbed/vanilla.yaml, the CPU forgetting testbed (`llmreg.testbed`, default build,
  cached) fine-tuned on the new skill `sub` (800 steps); eval/suites/testbed.yaml: exact match, target `sub`,
  retained the five pre-trained skills (the numbers `testbed.evaluate_all` gives).
- `stories260k`: stories260K (../shared/data/models) fine-tuned on GSM8K train: recipes/stories260k/gsm8k_sft.yaml
  when it exists, else `STORIES_FALLBACK` (plain LM loss on "Question: ...\\nAnswer: ..." text, the format of the
  gsm8k_ppl task); eval/suites/stories260k.yaml: word perplexity, target GSM8K test, retained TinyStories.

Every method of a setup starts from the same base model and differs only in its regularizer list (the recipe's
own `regularizers` are replaced). `METHODS` maps a name to a spec, a dict with:

- `regularizers`: a list of regularizer dicts, as in a recipe (`[{"name": "l2_sp", "lam": 1.0}]`);
- `prepare` (optional): `prepare(base_model_dir, workdir, steps) -> list[dict] | dict`, called before training
  with the setup's base model folder, an empty folder for this method and setup, and the number of training
  steps; it may run a preliminary phase (e.g. an importance pass) and returns the regularizer list to train
  with (`regularizers` is then ignored), or {"regularizers": [...], "model": folder} when training must start
  from another model than the base (forgetting_penalty with SI starts from the end of its importance run).

`forgetting_penalty (si)` and `(ewc)` run phase 1 (`llmreg importance`) on each setup's general data: the
testbed's old skills (`builtin:testbed_general`, recipes/forgetting/testbed_importance.yaml), and for
stories260K the TinyStories validation stories from line 500 on (the suite scores the first 200, so the two
do not overlap); then the penalty with its default options.

Scores follow `llmreg.eval.run`'s sign convention: `target_gain` > 0 is better on the new task, `forgetting`
(the mean retained drop) > 0 is ability lost, both in the suite metric's units (exact match 0-1; perplexity).

Outputs (in --out, default benchmarks/): forgetting_pareto.json; figures/forgetting_pareto_<setup>.png (gain
vs forgetting, one point per method, Pareto front ringed) and figures/forgetting_deltas_<setup>.png (per task the
base and each method's score, labelled with the change), both drawn by `llmreg.eval.run.write_plots`; and the
section between the markers below in RESULTS.md (created if missing; the rest of the file is kept). Models go to
--workdir (default runs/forgetting_pareto).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
BEGIN, END = "<!-- forgetting_pareto:begin -->", "<!-- forgetting_pareto:end -->"

# name -> {"regularizers": [...], "prepare": optional callable}; see the module docstring
METHODS: dict[str, dict[str, Any]] = {
    "vanilla": {"regularizers": []},
    "l2_sp": {"regularizers": [{"name": "l2_sp"}]},  # its default options (lam 0.01)
    "half_ft": {"regularizers": [{"name": "half_ft"}]},  # seed 0, the paper's category rule
    "lfu": {"regularizers": [{"name": "lfu"}]},  # paper defaults lam 5, alpha 0.1; aux reps (steering vectors)
    "lfu (lora)": {"regularizers": [{"name": "lfu", "aux": "lora"}]},  # the auxiliary LoRA perturbation
    # filled in below: they need the prepare function
}
SPEC_KEYS = {"regularizers", "prepare"}

STORIES_RECIPE = REPO / "recipes" / "stories260k" / "gsm8k_sft.yaml"
# used while recipes/stories260k/gsm8k_sft.yaml does not exist; data.train is filled in by stories_setup
STORIES_FALLBACK: dict[str, Any] = {
    "model": {"name_or_path": str(SHARED / "models" / "stories260K"), "dtype": "float32"},
    "trainer": {
        "kind": "hf",
        "max_steps": 300,
        "per_device_train_batch_size": 16,
        "learning_rate": 1.0e-3,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "logging_steps": 50,
        "save_strategy": "no",
    },
    "regularizers": [],
    "seed": 0,
}
# --smoke: a tiny testbed build, a few steps, a few documents per task
SMOKE = {
    "testbed_build": {"size": "tiny", "steps": 20, "batch_size": 16, "eval_n": 10},
    "steps": 3,
    "limit": {"testbed": 10, "stories260k": 4},
    "stories_examples": 64,
}


# -- setups ---------------------------------------------------------------------------------------------------------


def testbed_setup(smoke: bool) -> dict[str, Any]:
    """The testbed recipe (the default build, or a tiny one for --smoke) and its suite."""
    import yaml

    from llmreg import testbed
    from llmreg.testbed.build import check_build_options

    path = REPO / "recipes" / "testbed" / "vanilla.yaml"
    raw = yaml.safe_load(path.read_text())
    if smoke:
        raw["model"]["testbed"] = dict(SMOKE["testbed_build"])
    build = check_build_options(raw["model"]["testbed"])
    t0 = time.time()
    base = testbed.build(**build)  # the recipe would build it too; here it is also the base to score
    meta = json.loads((base / "testbed.json").read_text())
    return {
        "name": "testbed",
        "recipe_path": str(path),
        "raw": raw,
        "base": str(base),
        "suite": str(REPO / "eval" / "suites" / "testbed.yaml"),
        "limit": SMOKE["limit"]["testbed"] if smoke else None,
        "info": {
            "build": meta["config"],
            "build_train_seconds": meta["train_seconds"],
            "build_scores": json.loads((base / "scores.json").read_text()),
            "load_or_build_seconds": round(time.time() - t0, 1),
        },
    }


def stories_setup(smoke: bool, workdir: Path) -> dict[str, Any]:
    """stories260K on GSM8K train: the shipped recipe if there is one, else STORIES_FALLBACK on a text file."""
    import copy

    import yaml

    if STORIES_RECIPE.is_file():
        raw, recipe_path = yaml.safe_load(STORIES_RECIPE.read_text()), str(STORIES_RECIPE)
    else:
        raw, recipe_path = copy.deepcopy(STORIES_FALLBACK), None
        raw["data"] = {"train": str(gsm8k_text(workdir / "gsm8k_train_text.jsonl"))}
    raw.pop("eval_during_training", None)  # the suite runs after training here; during it, it only costs time
    if smoke:
        train = raw["data"]["train"]
        raw["data"]["train"] = {
            **({"path": train} if isinstance(train, str) else train),
            "max_examples": SMOKE["stories_examples"],
        }
    from llmreg.recipe.validate import validate_recipe

    base = validate_recipe(raw, recipe_path).model.name_or_path  # the recipe's path, resolved as training will
    return {
        "name": "stories260k",
        "recipe_path": recipe_path,
        "raw": raw,
        "base": base,
        "suite": str(REPO / "eval" / "suites" / "stories260k.yaml"),
        "limit": SMOKE["limit"]["stories260k"] if smoke else None,
        "info": {} if recipe_path else {"recipe_note": "STORIES_FALLBACK in benchmarks/forgetting_pareto.py"},
    }


def gsm8k_text(path: Path) -> Path:
    """GSM8K train as {"text": "Question: ...\\nAnswer: ..."} rows: the document format of the gsm8k_ppl task."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(SHARED / "gsm8k" / "train.jsonl") as src, open(path, "w") as out:
        for line in src:
            row = json.loads(line)
            out.write(json.dumps({"text": f"Question: {row['question']}\nAnswer: {row['answer']}"}) + "\n")
    return path


# -- one method on one setup -----------------------------------------------------------------------------------------


def importance_prepare(method: str) -> Callable[[str, str, int], dict[str, Any]]:
    """`prepare` for forgetting_penalty: `llmreg importance` on the setup's general data, then the penalty."""

    def prepare(base: str, workdir: str, steps: int) -> dict[str, Any]:
        from llmreg.recipe.importance import run_importance
        from llmreg.recipe.validate import validate_recipe

        raw = general_data_recipe(base, Path(workdir), steps)
        raw["importance"] = {"method": method, **({"num_samples": max(4, steps // 4)} if method == "ewc" else {})}
        raw["output_dir"] = str(Path(workdir) / "phase1")
        recipe = validate_recipe(raw, str(REPO / "recipes" / "forgetting" / "testbed_importance.yaml"))
        artifact = run_importance(recipe, overwrite=True)
        model = str(Path(recipe.output_dir) / "final") if method == "si" else base
        return {
            "regularizers": [{"name": "forgetting_penalty", "importance": method, "artifact": artifact}],
            "model": model,
        }

    prepare.__name__ = f"importance_prepare({method})"
    return prepare


def general_data_recipe(base: str, workdir: Path, steps: int) -> dict[str, Any]:
    """Phase-1 recipe over general data for `base`: a quarter as many steps as the fine-tuning."""
    import yaml

    phase1_steps = max(1, steps // 4)
    if (Path(base) / "testbed.json").is_file():
        raw = yaml.safe_load((REPO / "recipes" / "forgetting" / "testbed_importance.yaml").read_text())
        raw["data"]["num_examples"] = phase1_steps * raw["trainer"]["per_device_train_batch_size"]
    else:
        lines = [
            ln.strip()
            for ln in (SHARED / "tinystories" / "tinystories_validation_first1000.txt").read_text().splitlines()[500:]
            if ln.strip()
        ]
        path = workdir / "tinystories_general.jsonl"
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": ln}) + "\n" for ln in lines))
        raw = {
            "data": {"train": str(path)},
            "trainer": {
                "kind": "hf",
                "per_device_train_batch_size": 8,
                "learning_rate": 1e-4,
                "lr_scheduler_type": "constant",
                "warmup_steps": 0,
                "weight_decay": 0.0,
                "logging_steps": 25,
                "save_strategy": "no",
            },
        }
    raw["model"] = {"name_or_path": base, "dtype": "float32"}
    raw["tokenizer"] = {"name_or_path": base}
    raw["trainer"].update(max_steps=phase1_steps, disable_tqdm=True, save_strategy="no")
    return raw


def noisefit_prepare(base: str, workdir: str, steps: int) -> list[dict[str, Any]]:
    """noisefit with its default options (v1: k = 3 high-SNR layers, sigma 0.1, alpha 0.5, lambda 0.1); only a
    model with fewer than 3 decoder layers (the 2-layer --smoke testbed) gets k = its layer count."""
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(base).num_hidden_layers
    return [{"name": "noisefit"} if layers >= 3 else {"name": "noisefit", "num_layers": layers}]


METHODS["forgetting_penalty (si)"] = {"prepare": importance_prepare("si")}
METHODS["forgetting_penalty (ewc)"] = {"prepare": importance_prepare("ewc")}
METHODS["noisefit"] = {"prepare": noisefit_prepare}


def method_regularizers(name: str, spec: dict[str, Any], base: str, workdir: Path, steps: int) -> dict[str, Any]:
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"METHODS[{name!r}]: unknown keys {sorted(unknown)} (a spec has {sorted(SPEC_KEYS)})")
    prepare: Callable[[str, str, int], Any] | None = spec.get("prepare")
    if prepare is None:
        return {"regularizers": [dict(r) for r in spec.get("regularizers", [])], "model": None}
    workdir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(base, str(workdir), steps)
    if isinstance(prepared, dict):
        return {"regularizers": list(prepared["regularizers"]), "model": prepared.get("model")}
    return {"regularizers": list(prepared), "model": None}


def train_method(
    setup: dict[str, Any], regularizers: list[dict], steps: int | None, output_dir: Path, model: str | None = None
) -> str:
    """Train the setup's recipe with `regularizers` (and `steps`, and a starting `model`, if given); returns the
    final model folder."""
    import copy

    from llmreg.recipe.run import train
    from llmreg.recipe.validate import validate_recipe

    raw = copy.deepcopy(setup["raw"])
    raw["regularizers"] = regularizers
    raw["output_dir"] = str(output_dir)
    if model is not None:
        raw["model"] = {"name_or_path": model, "dtype": raw["model"].get("dtype", "float32")}
        raw["tokenizer"] = {"name_or_path": model}
    if steps is not None:
        raw["trainer"]["max_steps"] = steps
    if setup["name"] == "testbed":  # one pass over fresh examples, as testbed.finetune draws them
        raw["data"]["num_examples"] = raw["trainer"]["max_steps"] * raw["trainer"]["per_device_train_batch_size"]
    raw["trainer"].update(disable_tqdm=True, save_strategy="no")
    recipe = validate_recipe(raw, setup["recipe_path"])
    return train(recipe, overwrite=True).final_dir


def run_setup(
    setup: dict[str, Any], methods: dict[str, dict], steps: int | None, workdir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Base and per-method suite scores, the forgetting report, timings."""
    from llmreg.eval.run import evaluate_suite, forgetting_report
    from llmreg.eval.suite import load_suite

    suite = load_suite(setup["suite"])
    t0 = time.time()
    base_scores = evaluate_suite(suite, setup["base"], limit=setup["limit"], batch_size=32)
    log(f"[{setup['name']}] base {dict(base_scores)} ({time.time() - t0:.0f} s)")
    runs, details = {}, {}
    for name, spec in methods.items():
        out = workdir / setup["name"] / name
        t0 = time.time()
        prepared = method_regularizers(
            name, spec, setup["base"], out / "prepare", steps or setup["raw"]["trainer"]["max_steps"]
        )
        regularizers = prepared["regularizers"]
        t1 = time.time()
        final = train_method(setup, regularizers, steps, out, model=prepared["model"])
        t2 = time.time()
        runs[name] = evaluate_suite(suite, final, limit=setup["limit"], batch_size=32)
        details[name] = {
            "regularizers": regularizers,
            "prepare_seconds": round(t1 - t0, 1),
            "train_seconds": round(t2 - t1, 1),
            "eval_seconds": round(time.time() - t2, 1),
        }
        log(f"[{setup['name']}] {name}: {dict(runs[name])} (train {t2 - t1:.0f} s)")
    report = forgetting_report(base_scores, runs, suite)
    for name, extra in details.items():
        report["runs"][name].update(extra)
    steps_used = steps or setup["raw"]["trainer"]["max_steps"]
    limit = setup["limit"] if setup["limit"] is not None else suite.limit  # documents per task; None: all
    return {
        "recipe": setup["recipe_path"],
        "suite": os.path.relpath(setup["suite"], REPO),
        "base_model": setup["base"],
        "steps": steps_used,
        "limit": limit,
        **setup["info"],
        "report": report,
    }


# -- outputs ---------------------------------------------------------------------------------------------------------


def write_figures(results: dict[str, Any], figures: Path) -> list[Path]:
    """Per setup: the Pareto and per-task plots of llmreg.eval.run.write_plots, renamed after the setup."""
    from llmreg.eval.run import write_plots

    figures.mkdir(parents=True, exist_ok=True)
    written = []
    for setup, result in results["setups"].items():
        with tempfile.TemporaryDirectory() as tmp:
            deltas, pareto = write_plots(result["report"], tmp)
            for src, kind in ((pareto, "pareto"), (deltas, "deltas")):
                dst = figures / f"forgetting_{kind}_{setup}.png"
                shutil.move(src, dst)
                written.append(dst)
    return written


def _in_checkout(path: str) -> str:
    """A recipe path as it reads in any checkout (`recipes/...`): the results may come from another checkout."""
    marker = os.sep + "recipes" + os.sep
    return path[path.rindex(marker) + 1 :] if marker in path else os.path.relpath(path, REPO)


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}"  # exact match 0.855, perplexity 50.68 or 2.168e+09 alike


def markdown_section(results: dict[str, Any], figures_rel: str) -> str:
    """The generated RESULTS.md section: per setup, a table of base and methods, and the figures."""
    lines = [
        BEGIN,
        "## Forgetting Pareto (generated by benchmarks/forgetting_pareto.py)",
        "",
        f"Command: `{results['command']}`; {results['machine']}; total {results['total_seconds']:.0f} s.",
        "Gain and drop follow `llmreg.eval.run` (positive gain = better on the new task, positive drop ="
        ' retained ability lost), in the suite metric\'s units; "Pareto" marks methods no other method'
        " beats on both.",
        "",
    ]
    for setup, r in results["setups"].items():
        report = r["report"]
        tasks = list(report["base"])
        target = [t for t in tasks if next(iter(report["runs"].values()))["tasks"][t]["role"] == "target"]
        retain = [t for t in tasks if t not in target]
        metric = report["metrics"].get(tasks[0], "").split(",")[0]
        lines += [
            f"### {setup}",
            "",
            f"Recipe `{_in_checkout(r['recipe']) if r['recipe'] else r['recipe_note']}`"
            f" ({r['steps']} steps), suite `{r['suite']}` ({metric}"
            f"{', lower is better' if metric.endswith('perplexity') else ''};"
            f" {r['limit'] or 'all'} documents per task).",
            "",
        ]
        if "build" in r:
            b = r["build"]
            lines += [
                f"Testbed build: {b['size']} Llama, {b['steps']} steps x {b['batch_size']}, seed {b['seed']},"
                f" {r['build_train_seconds']:.0f} s training (cached afterwards). Scores after the build:"
                f" {', '.join(f'{k} {v:.3f}' for k, v in r['build_scores'].items())}.",
                "",
            ]
        if metric.endswith("perplexity"):
            lines += [
                "Gains and drops are differences of raw perplexities, so a very high base perplexity dominates"
                " the target gain: compare the tuned values (the per-task plot shows them on a log axis, each"
                " labelled with its ratio to the base).",
                "",
            ]
        head = ["method", "target gain", "mean retained drop", "Pareto", *target, *retain, "prepare s", "train s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines.append("| base | | | | " + " | ".join(_num(report["base"][t]) for t in target + retain) + " | | |")
        for name, run in report["runs"].items():
            cells = [
                name,
                _num(run["target_gain"]),
                _num(run["forgetting"]),
                "yes" if name in report["pareto_front"] else "",
                *(_num(run["tasks"][t]["tuned"]) for t in target + retain),
                f"{run['prepare_seconds']:.0f}",
                f"{run['train_seconds']:.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            f"![{setup} Pareto]({figures_rel}/forgetting_pareto_{setup}.png)"
            f" ![{setup} per-task scores]({figures_rel}/forgetting_deltas_{setup}.png)",
            "",
        ]
    return "\n".join(lines + [END])


def replace_section(path: Path, section: str) -> None:
    """Put `section` between this script's markers in `path` (appended, with the markers, when they are missing)."""
    from llmreg.eval.run import replace_marked_section

    replace_marked_section(path, section, BEGIN, END)


# -- command line ----------------------------------------------------------------------------------------------------


def replot(out: Path) -> int:
    """Figures and the RESULTS.md section from the saved results, without training or evaluating."""
    results = json.loads((out / "forgetting_pareto.json").read_text())
    figures = write_figures(results, out / "figures")
    replace_section(out / "RESULTS.md", markdown_section(results, "figures"))
    print(f"wrote {out / 'RESULTS.md'}, {', '.join(str(f) for f in figures)}", flush=True)
    return 0


def select_methods(names: list[str] | None) -> dict[str, dict]:
    from llmreg.core.options import closest

    if not names:
        return dict(METHODS)
    for name in names:
        if name not in METHODS:
            hint = closest(name, METHODS)
            raise KeyError(
                f"unknown method {name!r}"
                + (f"; did you mean {hint!r}?" if hint else "")
                + f" (methods: {', '.join(METHODS)})"
            )
    return {name: METHODS[name] for name in names}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", metavar="NAME", help=f"subset of {', '.join(METHODS)} (default: all)")
    p.add_argument("--steps", type=int, help="training steps for every setup (default: each recipe's own)")
    p.add_argument("--smoke", action="store_true", help="tiny testbed build, a few steps, a few documents per task")
    p.add_argument("--out", help="folder for the json, figures/ and RESULTS.md (default: benchmarks/)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other methods of the existing forgetting_pareto.json in --out and replace or add "
        "only the methods run now (same base models and steps assumed; checked)",
    )
    p.add_argument(
        "--workdir", help="folder for the trained models (default: runs/forgetting_pareto, with --smoke <out>/work)"
    )
    p.add_argument(
        "--replot",
        action="store_true",
        help="redraw the figures and the RESULTS.md section from forgetting_pareto.json in --out; train nothing",
    )
    args = p.parse_args(argv)
    if args.replot:
        return replot(Path(args.out) if args.out else REPO / "benchmarks")
    if args.smoke and not args.out:
        p.error("--smoke needs --out DIR (it must not overwrite the real results in benchmarks/)")
    try:
        methods = select_methods(args.methods)
    except KeyError as err:
        p.error(err.args[0])
    out = Path(args.out) if args.out else REPO / "benchmarks"
    workdir = (
        Path(args.workdir) if args.workdir else (out / "work" if args.smoke else REPO / "runs" / "forgetting_pareto")
    )
    steps = args.steps if args.steps is not None else (SMOKE["steps"] if args.smoke else None)
    if args.smoke:  # the tiny build goes into the smoke folder, not the user's cache
        os.environ["LLMREG_CACHE"] = str(out / "cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local suites only

    def log(line: str) -> None:
        print(line, flush=True)

    t0 = time.time()
    results: dict[str, Any] = {
        "command": " ".join(["python benchmarks/forgetting_pareto.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {_threads()}, "
        f"load {os.getloadavg()[0]:.2f} at start",
        "methods": {
            name: {"regularizers": spec.get("regularizers", []), "prepare": _callable_name(spec.get("prepare"))}
            for name, spec in methods.items()
        },
        "setups": {},
    }
    for setup in (testbed_setup(args.smoke), stories_setup(args.smoke, workdir)):
        results["setups"][setup["name"]] = run_setup(setup, methods, steps, workdir, log)
    results["total_seconds"] = round(time.time() - t0, 1)
    if args.merge:
        results = merge_results(json.loads((out / "forgetting_pareto.json").read_text()), results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forgetting_pareto.json").write_text(json.dumps(results, indent=2))
    figures = write_figures(results, out / "figures")
    replace_section(out / "RESULTS.md", markdown_section(results, "figures"))
    log(f"wrote {out / 'forgetting_pareto.json'}, {out / 'RESULTS.md'}, {', '.join(str(f) for f in figures)}")
    return 0


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with the methods of `new` added or replaced, per setup; the Pareto front recomputed.

    Refuses to mix runs of different settings (steps, base model, document limit): their scores would not be
    comparable."""
    from llmreg.eval.run import pareto_front

    merged = json.loads(json.dumps(old))
    merged["methods"].update(new["methods"])
    merged["command"] = f"{old.get('command', '?')}; then {new['command']}"
    merged["total_seconds"] = round(old.get("total_seconds", 0.0) + new["total_seconds"], 1)
    for name, setup in new["setups"].items():
        if name not in merged["setups"]:
            merged["setups"][name] = setup
            continue
        kept = merged["setups"][name]
        for key in ("steps", "base_model", "limit"):
            if kept.get(key) != setup.get(key):
                raise SystemExit(
                    f"--merge: setup {name!r} differs in {key!r} ({kept.get(key)!r} in the existing "
                    f"results, {setup.get(key)!r} now); rerun all methods instead"
                )
        runs = kept["report"]["runs"]
        runs.update(setup["report"]["runs"])
        kept["report"]["pareto_front"] = pareto_front(
            {n: (r["forgetting"] or 0.0, r["target_gain"] or 0.0) for n, r in runs.items()}
        )
    return merged


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _callable_name(fn: Any) -> str | None:
    return None if fn is None else f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


if __name__ == "__main__":
    sys.exit(main())
