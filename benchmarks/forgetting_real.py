"""Forgetting on a real instruct LLM (issue 18): every method against the baselines, each run cached.

    python benchmarks/forgetting_real.py --list                          # the matrix, with what is done
    python benchmarks/forgetting_real.py --only vanilla                  # train (or reuse) and evaluate one run
    python benchmarks/forgetting_real.py --only vanilla,"lora r16" --train-only
    python benchmarks/forgetting_real.py                                 # everything not yet done, in order
    python benchmarks/forgetting_real.py --report                        # table, figure, RESULTS.md from the json
    python benchmarks/forgetting_real.py --setting tiny --workdir /tmp/fr --out /tmp/fr   # the CI version

Settings and the run matrix: benchmarks/forgetting_real_matrix.py. Each run is trained through the recipe layer
(`llmreg.recipe`: the setting's recipe with the run's regularizers / peft / trainer keys / seed), or, for WiSE-FT,
merged with `llmreg.eval.merge` from a trained run; then scored with `llmreg.eval.run.evaluate_suite` on the
setting's suite. Nothing is done twice: a run's folder is `<workdir>/<setting>/<slug>-<hash>/`, the hash over
everything that decides its result (the recipe as parsed, the run's config, the setting's overrides), with
`run.json` (train / prepare seconds, final model) written when training ends and `eval-<suite hash>.json` when
its evaluation ends; the base is evaluated once (`<workdir>/<setting>/base-eval-<suite hash>.json`). A run cut
short is redone from the start. Checkpoints stay in the workdir (default /work/bench_runs/forgetting_real,
outside the checkout); the results go to <out>/forgetting_real_<setting>.json, its per-document companion
<out>/forgetting_real_<setting>_per_doc.jsonl, <out>/figures/forgetting_real_*.png and the marked sections of
<out>/RESULTS.md (forgetting_real_report.py). The committed records are the durable ones: on a machine without the
workdir (a new session), `restore` writes them back into it first, so a run done once is never redone for its
scores and the report is rewritten from them; only the weights are gone (a merge of a restored run retrains it).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forgetting_real_matrix import (  # noqa: E402
    MATRICES,
    REGIME_REFERENCES,
    SETTINGS,
    importance_recipe,
    replay_source,
    slug,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = Path(os.environ.get("LLMREG_BENCH_RUNS", "/work/bench_runs")) / "forgetting_real"
# bump when the eval cache's content changes (2: per-document scores, llmreg.eval.per_doc; 3: gold_prob)
EVAL_FORMAT = 3


def sha(data: Any, n: int = 12) -> str:
    blob = data if isinstance(data, bytes) else json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def run_key(setting: str, run: dict[str, Any], runs_by_name: dict[str, dict]) -> str:
    """The hash of what decides a run's model: the effective recipe (the parsed recipe with the setting's and the
    run's overrides applied, output_dir left out), a phase before training, a merge (with the key of the run it
    merges); not the run's name. So moving a calibrated value into the recipe keeps the run that used it."""
    if "merge" in run:
        return sha({"merge": run["merge"], "of": run_key(setting, runs_by_name[run["merge"]["of"]], runs_by_name)})
    raw = recipe_raw(setting, run, Path("."))
    raw.pop("output_dir")
    return sha({"recipe": raw, "prepare": run.get("prepare"), "penalty": run.get("penalty")})


def recipe_content(setting: str) -> dict[str, Any]:
    """The recipe as parsed: editing its comments does not invalidate the runs done."""
    import yaml

    return yaml.safe_load(Path(SETTINGS[setting]["recipe"]).read_text())


def run_dir(workdir: Path, setting: str, run: dict, runs_by_name: dict) -> Path:
    return workdir / setting / f"{slug(run['name'])}-{run_key(setting, run, runs_by_name)}"


def _no_comments(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))


def suite_key(setting: str) -> str:
    """The hash of what decides an evaluation: the suite's entries, its task files and the tasks' Python hooks
    (comment lines left out, so documenting them invalidates nothing), the limit, the cache format."""
    from llmreg.eval.suite import load_suite

    conf = SETTINGS[setting]
    suite = load_suite(str(conf["suite"]))
    hooks = [p.read_text() for p in sorted((REPO / "eval" / "tasks").glob("*.py"))]
    return sha(
        {
            "entries": [vars(e) for e in suite.entries],
            "tasks": {t: _no_comments(text) for t, (text, _) in sorted(suite.local_tasks.items())},
            "hooks": [_no_comments(h) for h in hooks],
            "limit": conf["limit"],
            "format": EVAL_FORMAT,
        }
    )


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    tmp.replace(path)  # atomic: a run cut short leaves no half-written record


# -- training ----------------------------------------------------------------------------------------------------


def recipe_raw(setting: str, run: dict[str, Any], out: Path) -> dict[str, Any]:
    conf = SETTINGS[setting]
    raw = recipe_content(setting)
    raw["trainer"].update(conf["trainer"])
    raw["data"]["train"].update(conf["data"])
    if run.get("replay"):  # a mixture: the recipe's source and general text (forgetting_real_matrix.replay_source)
        raw["data"]["train"] = [{**raw["data"]["train"], "weight": 1 - run["replay"]}, replay_source(run["replay"])]
        raw["data"]["mix"] = {"strategy": "interleave", "stopping": "first_exhausted", "seed": run["seed"]}
    raw["trainer"].update(run.get("trainer", {}))
    raw["trainer"].update(disable_tqdm=True, save_strategy="no")
    if "eval_during_training" in conf:
        raw.pop("eval_during_training", None)
    raw["regularizers"] = copy.deepcopy(run.get("regularizers", []))
    if run.get("peft"):
        raw["peft"] = dict(run["peft"])
    raw["seed"] = run["seed"]
    raw["output_dir"] = str(out)
    return raw


def prepare(setting: str, run: dict[str, Any], raw: dict[str, Any], out: Path) -> dict[str, Any]:
    """forgetting_penalty: phase 1 (`llmreg importance`) on general text; the penalty joins the regularizers and
    an si run starts from phase 1's final model."""
    from llmreg.recipe.importance import run_importance
    from llmreg.recipe.validate import validate_recipe

    method = run["prepare"].split(":", 1)[1]
    phase1 = validate_recipe(importance_recipe(raw, method, out), str(SETTINGS[setting]["recipe"]))
    artifact = run_importance(phase1, overwrite=True)
    raw["regularizers"] = [{"name": "forgetting_penalty", "importance": method, "artifact": artifact}]
    raw["regularizers"][0].update(run.get("penalty", {}))
    if method == "si":
        raw["model"] = {"name_or_path": str(Path(phase1.output_dir) / "final"), "dtype": "float32"}
        raw["tokenizer"] = {"name_or_path": str(Path(phase1.output_dir) / "final")}
    return raw


def train_run(setting: str, run: dict[str, Any], out: Path, runs_by_name: dict, workdir: Path) -> dict[str, Any]:
    """Train (or merge) one run into `out`; its record (also written to out/run.json)."""
    t0 = time.time()
    if "merge" in run:
        final = merge_run(setting, run, out, runs_by_name, workdir)
        record = {"final": final, "train_seconds": round(time.time() - t0, 1), "prepare_seconds": 0.0}
    else:
        from llmreg.recipe.run import train
        from llmreg.recipe.validate import validate_recipe

        raw = recipe_raw(setting, run, out)
        if run.get("prepare"):
            raw = prepare(setting, run, raw, out)
        t1 = time.time()
        result = train(validate_recipe(raw, str(SETTINGS[setting]["recipe"])), overwrite=True)
        record = {
            "final": str(result.final_dir),
            "train_seconds": round(time.time() - t1, 1),
            "prepare_seconds": round(t1 - t0, 1),
            "regularizers": raw["regularizers"],
        }
    record.update(name=run["name"], config=run, load_1min=os.getloadavg()[0], finished=time.strftime("%F %T"))
    write_json(out / "run.json", record)
    return record


def merge_run(setting: str, run: dict[str, Any], out: Path, runs_by_name: dict, workdir: Path) -> str:
    """WiSE-FT: (1 - alpha) * base + alpha * the tuned run (trained first if it is not yet)."""
    from llmreg.eval.merge import merge, plan_merge

    of = runs_by_name[run["merge"]["of"]]
    tuned = ensure_trained(setting, of, runs_by_name, workdir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_merge(SETTINGS[setting]["base"], tuned["final"], str(run["merge"]["alpha"]), str(out), overwrite=True)
    return merge(plan)[0]


def ensure_trained(setting: str, run: dict, runs_by_name: dict, workdir: Path) -> dict[str, Any]:
    out = run_dir(workdir, setting, run, runs_by_name)
    record = read_json(out / "run.json")
    if record is not None and Path(record["final"]).is_dir():
        return record
    print(f"[{setting}] training {run['name']} -> {out}", flush=True)
    return train_run(setting, run, out, runs_by_name, workdir)


# -- evaluation --------------------------------------------------------------------------------------------------


def evaluate(setting: str, model: str, path: Path) -> dict[str, Any]:
    """Suite scores of `model`, cached in `path` (per-document scores kept when llmreg.eval provides them)."""
    cached = read_json(path)
    if cached is not None:
        return cached
    from llmreg.eval.run import evaluate_suite

    print(f"[{setting}] evaluating {model}", flush=True)
    conf = SETTINGS[setting]
    t0 = time.time()
    scores = evaluate_suite(str(conf["suite"]), model, limit=conf["limit"], batch_size=conf["batch_size"])
    record = {
        "scores": dict(scores),
        "metrics": dict(getattr(scores, "metrics", {})),
        "per_doc": getattr(scores, "per_doc", None),
        "eval_seconds": round(time.time() - t0, 1),
        "load_1min": os.getloadavg()[0],
        "model": model,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record


def do_run(setting: str, run: dict, runs_by_name: dict, workdir: Path, train_only: bool) -> dict[str, Any]:
    out = run_dir(workdir, setting, run, runs_by_name)
    eval_path = out / f"eval-{suite_key(setting)}.json"
    evaluated = read_json(eval_path)
    if evaluated is not None and not train_only:  # done (perhaps restored from the committed records: no weights)
        return {"train": read_json(out / "run.json"), "eval": evaluated}
    record = ensure_trained(setting, run, runs_by_name, workdir)
    if train_only:
        return {"train": record}
    return {"train": record, "eval": evaluate(setting, record["final"], eval_path)}


# -- the committed records ---------------------------------------------------------------------------------------


def committed_paths(setting: str, out: Path) -> tuple[Path, Path]:
    """The committed json (records without per-document scores) and its per-document companion (one json line per
    evaluated record: run name, run hash, per-document scores), both written by forgetting_real_report."""
    return out / f"forgetting_real_{setting}.json", out / f"forgetting_real_{setting}_per_doc.jsonl"


def committed_base(setting: str, out: Path | None) -> dict | None:
    """The committed base evaluation (no per-document scores) when it was made with today's suite."""
    committed = None if out is None else read_json(committed_paths(setting, out)[0])
    if committed is None or committed.get("suite_key") != suite_key(setting):
        return None
    return committed.get("base_eval")


def restore(setting: str, runs: list[dict], workdir: Path, out: Path) -> int:
    """Write back into the workdir the records of the runs the committed json holds and the workdir lacks (a new
    machine, a lost workdir): run.json and, when the committed suite key is today's, the evaluation with its
    per-document scores from the companion file. A record whose per-document scores were never committed (runs
    reported before they were) keeps its committed report entry instead (`report_entry`): shown, not re-paired.
    Restored runs have no weights: a merge of one retrains it. Returns the number of records written."""
    json_path, per_doc_path = committed_paths(setting, out)
    committed = read_json(json_path)
    if committed is None:
        return 0
    per_doc = {}
    if per_doc_path.is_file():
        for line in per_doc_path.read_text().splitlines():
            row = json.loads(line)
            per_doc[(row["run"], row["hash"])] = row["per_doc"]
    key = suite_key(setting)
    same_suite = committed.get("suite_key") == key
    entries = (committed.get("report") or {}).get("runs", {})
    by_name = {r["name"]: r for r in runs}
    written = 0

    def put(path: Path, record: dict) -> None:
        nonlocal written
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, record)
            written += 1

    base = committed.get("base_eval")
    if same_suite and base is not None and ("(base)", key) in per_doc:
        put(workdir / setting / f"base-eval-{key}.json", {**base, "per_doc": per_doc[("(base)", key)]})
    for name, rec in committed.get("runs", {}).items():
        run = by_name.get(name)
        if run is None or rec.get("hash") != run_dir(workdir, setting, run, by_name).name:
            continue  # no longer in the matrix, or its config changed: the record is of another model
        folder = workdir / setting / rec["hash"]
        put(folder / "run.json", rec["train"])
        if same_suite and rec.get("eval"):
            scores = per_doc.get((name, rec["hash"]))
            extra = {"per_doc": scores} if scores is not None else {"report_entry": entries.get(name)}
            put(folder / f"eval-{key}.json", {**rec["eval"], **extra})
    return written


def collect(setting: str, runs: list[dict], workdir: Path, out: Path | None = None) -> dict[str, Any]:
    """Everything done so far (base, runs with train and eval records) from the caches (the base's committed
    scores when its cache is gone and no per-document scores were committed to restore it from)."""
    by_name = {r["name"]: r for r in runs}
    key = suite_key(setting)
    done: dict[str, Any] = {}
    for run in runs:
        folder = run_dir(workdir, setting, run, by_name)
        train = read_json(folder / "run.json")
        if train is not None:
            # the matrix's name, method and strength of the run, not those its record was written with: the hash
            # says the training is the same; a renamed or re-labelled run keeps its cache
            train = {**train, "name": run["name"], "config": run}
            done[run["name"]] = {"train": train, "eval": read_json(folder / f"eval-{key}.json"), "hash": folder.name}
    return {
        "setting": setting,
        "suite_key": key,
        "regime_references": REGIME_REFERENCES.get(setting, {}),
        "suite": os.path.relpath(SETTINGS[setting]["suite"], REPO),
        "recipe": os.path.relpath(SETTINGS[setting]["recipe"], REPO),
        "base_eval": read_json(workdir / setting / f"base-eval-{key}.json") or committed_base(setting, out),
        "runs": done,
        "matrix": runs,
    }


def list_runs(setting: str, runs: list[dict], workdir: Path, out: Path) -> None:
    state = collect(setting, runs, workdir, out)
    print(f"base: {'evaluated' if state['base_eval'] else 'not evaluated'}")
    for run in runs:
        got = state["runs"].get(run["name"])
        status = "-" if got is None else ("trained+evaluated" if got["eval"] else "trained")
        print(f"{run['name']:32s} {run['method']:28s} {status}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="smollm2")
    p.add_argument("--only", help="comma-separated run names (see --list); default: every run not yet done")
    p.add_argument("--list", action="store_true", help="print the matrix and what is cached, then exit")
    p.add_argument("--train-only", action="store_true", help="train (and cache) without evaluating")
    p.add_argument("--report", action="store_true", help="only rewrite the json, figure and RESULTS.md section")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="run folders and caches")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks", help="forgetting_real.json, figures/, RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = MATRICES[args.setting]()
    by_name = {r["name"]: r for r in runs}
    restored = restore(args.setting, runs, args.workdir, args.out)
    if restored:
        print(f"restored {restored} records from the committed json into {args.workdir}")
    if args.list:
        list_runs(args.setting, runs, args.workdir, args.out)
        return 0
    wanted = [n.strip() for n in args.only.split(",")] if args.only else list(by_name)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        print(f"error: unknown run(s) {unknown}; see --list", file=sys.stderr)
        return 2
    if not args.report:
        if not args.train_only:
            base_cache = args.workdir / args.setting / f"base-eval-{suite_key(args.setting)}.json"
            evaluate(args.setting, SETTINGS[args.setting]["base"], base_cache)
        for name in wanted:
            do_run(args.setting, by_name[name], by_name, args.workdir, args.train_only)
    from forgetting_real_report import write_outputs

    write_outputs(collect(args.setting, runs, args.workdir, args.out), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
