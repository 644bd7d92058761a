"""`llmreg` command line: train, validate, list.

    llmreg train RECIPE [key=value ...] [--resume | --overwrite]
    llmreg importance RECIPE [key=value ...] [--overwrite]
    llmreg validate RECIPE [key=value ...]
    llmreg list
    llmreg eval --suite SUITE --model PATH [--model PATH ...] [--base PATH] --out DIR [--limit N]
    llmreg export RUN_DIR OUT_DIR [--overwrite] [--no-verify]
    llmreg sweep RECIPE [key=value ...] --grid key=v1,v2 [key=v1,v2 ...] [--out DIR] [--overwrite]
    llmreg ensemble MODEL [MODEL ...] (--recipe RECIPE [--set key=value ...] | --suite SUITE) [--combine ...]

`train` also runs under `torchrun --nproc_per_node N -m llmreg.cli train ...`,
`accelerate launch -m llmreg.cli train ...` and the `deepspeed` launcher: the
trainer does the distribution, and only rank 0 prints. A bad recipe exits with
status 2 and one line `error: <message>` on stderr, before anything is loaded.
A recipe with `stages:` trains its stages in turn (llmreg.recipe.stages); `validate` shows each stage.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

EXIT_CONFIG_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    from llmreg.core.options import ConfigError

    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """argparse stops filling `overrides` at the first option (`train r.yaml --resume a=1`); pick up the
    key=value arguments that come after an option here."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmreg", description="Regularized LLM training from YAML recipes.")
    _launcher_args(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,importance,validate,list,eval,testbed,export,sweep,ensemble}")

    train = sub.add_parser("train", help="validate a recipe, then train", description="Validate, then train.")
    _recipe_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    train.add_argument("--overwrite", action="store_true",
                       help="delete an earlier run's checkpoints, metrics and final model in output_dir first")
    train.set_defaults(func=cmd_train)

    imp = sub.add_parser("importance", help="phase 1 of forgetting_penalty: record importance, write the artifact",
                         description="Run a recipe with an `importance:` section (si: train on general data and "
                                     "record the SI path integral; ewc: the diagonal Fisher, no training) and "
                                     "write <output_dir>/importance for forgetting_penalty's `artifact`.")
    _recipe_args(imp)
    imp.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    imp.set_defaults(func=cmd_importance)

    validate = sub.add_parser("validate", help="check a recipe without loading a model or data")
    _recipe_args(validate)
    validate.set_defaults(func=cmd_validate)

    lst = sub.add_parser("list", help="show the registered regularizers and their options")
    lst.set_defaults(func=cmd_list)

    ev = sub.add_parser("eval", help="evaluate fine-tuned models against a base on a suite: gain vs forgetting",
                        description="Run a suite (eval/suites/*.yaml) with lm-eval on the base and each model; "
                                    "write forgetting_report.{json,md}, deltas.png and pareto.png into --out.")
    ev.add_argument("--suite", required=True, help="suite YAML, e.g. eval/suites/stories260k.yaml")
    ev.add_argument("--model", action="append", required=True, metavar="PATH",
                    help="fine-tuned model directory (or hub name when online); repeat for several runs")
    ev.add_argument("--base", metavar="PATH", help="the model before fine-tuning (default: the first --model)")
    ev.add_argument("--out", required=True, metavar="DIR", help="folder for the report files")
    ev.add_argument("--limit", type=int, help="at most N documents per task (quick runs)")
    ev.add_argument("--cache-dir", help="base-score cache (default ~/.cache/llmreg/eval)")
    ev.set_defaults(func=cmd_eval, overrides=[])
    tb = sub.add_parser("testbed", help="build the CPU forgetting testbed, or fine-tune it on its new skill",
                        add_help=False)
    tb.add_argument("rest", nargs=argparse.REMAINDER, help="build | forget PATH ... (see --help after it)")
    tb.set_defaults(func=cmd_testbed, overrides=[])
    ex = sub.add_parser("export", help="fold learnable multipliers into plain weights (loads with stock transformers)",
                        description="Merge the `multipliers` regularizer's lrm_* parameters of RUN_DIR/final (or of "
                                    "the model folder RUN_DIR) into the weights and write a plain model to OUT_DIR; "
                                    "checks that the logits on a fixed batch are unchanged.")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (uses its final/) or a model folder")
    ex.add_argument("out_dir", metavar="OUT_DIR", help="folder for the plain model")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    ex.add_argument("--no-verify", dest="verify", action="store_false", help="skip the logit comparison")
    ex.set_defaults(func=cmd_export, overrides=[])

    sw = sub.add_parser("sweep", help="run a grid of a pretrain recipe, one run after another (resumable)",
                        description="Train every point of the grid (skipping finished ones), then tabulate the "
                                    "final validation loss and check the best point's grid neighbours "
                                    "(llmreg.pretrain.sweep). Base overrides go before --grid.")
    _recipe_args(sw)
    sw.add_argument("--grid", nargs="+", required=True, metavar="key=v1,v2",
                    help="one axis per argument, e.g. trainer.weight_decay=0.1,0.4,1.6 trainer.num_train_epochs=4,8")
    sw.add_argument("--out", metavar="DIR", help="sweep folder (default <output_dir>/sweep)")
    sw.add_argument("--overwrite", action="store_true", help="redo every point, finished ones included")
    sw.set_defaults(func=cmd_sweep)
    en = sub.add_parser("ensemble", help="evaluate K checkpoints as one model (averaged logits or probabilities)",
                        description="Validation loss of the first k members for k = 1..K on a pretrain recipe's "
                                    "held-out blocks (--recipe), or the ensemble's scores on an eval suite "
                                    "(--suite, lm-eval). Members: run folders (their final/) or model folders.")
    en.add_argument("members", nargs="+", metavar="MODEL", help="run output_dirs (final/ is used) or model folders")
    what = en.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", metavar="RECIPE", help="a recipe with data.pretrain: its validation blocks")
    what.add_argument("--suite", metavar="SUITE", help="an eval suite YAML (eval/suites/...)")
    en.add_argument("--set", nargs="+", default=[], metavar="key=value", help="overrides of --recipe")
    en.add_argument("--combine", choices=("logits", "probs"), default="logits",
                    help="average the logits (default, product of experts) or the probabilities (mixture)")
    en.add_argument("--limit", type=int, help="--suite: at most N documents per task")
    en.add_argument("--out", metavar="FILE", help="also write the results as JSON")
    en.set_defaults(func=cmd_ensemble, overrides=[])
    return parser


def cmd_ensemble(args: argparse.Namespace) -> int:
    import json

    from llmreg.core.options import ConfigError
    from llmreg.pretrain.ensemble import check_member_paths

    members = [os.path.join(m, "final") if os.path.isfile(os.path.join(m, "final", "config.json")) else m
               for m in args.members]
    check_member_paths(members)  # before anything loads
    if args.recipe is not None:
        from llmreg.recipe import load_recipe

        recipe = load_recipe(args.recipe, [*args.set, *args.overrides])
        if _is_staged(recipe) or recipe.data.pretrain is None:
            raise ConfigError(f"ensemble --recipe: {args.recipe} has no data.pretrain (its held-out blocks are the "
                              "validation set); use --suite for other evaluations")
        result = _ensemble_validation(recipe, members, args.combine)
        _say(*(f"  K={k}  ensemble {loss:.4f}   member {k}: {single:.4f}" for k, loss, single in
               zip(result["K"], result["ensemble_loss"], result["member_losses"])))
    else:
        from llmreg.pretrain.ensemble import evaluate_ensemble_suite

        scores = evaluate_ensemble_suite(args.suite, members, combine=args.combine, limit=args.limit)
        result = {"members": members, "combine": args.combine, "suite": args.suite, "scores": dict(scores)}
        _say(*(f"  {task}: {value:.4g}" for task, value in result["scores"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        _say(f"wrote {args.out}")
    return 0


def _ensemble_validation(recipe, members: list[str], combine: str) -> dict:
    """Validation loss (nats per token) of each member and of the first k members together, k = 1..K."""
    from transformers import AutoTokenizer

    from llmreg.core.options import ConfigError
    from llmreg.pretrain.data import pretrain_blocks
    from llmreg.pretrain.ensemble import EnsembleCausalLM, load_members, validation_loss

    _, val = pretrain_blocks(recipe, AutoTokenizer.from_pretrained(members[0]))
    if not len(val):
        raise ConfigError("ensemble --recipe: the recipe holds out no validation blocks (data.eval or "
                          "data.pretrain.validation_fraction)")
    models = load_members(members)
    return {"members": members, "combine": combine, "blocks": len(val), "K": list(range(1, len(models) + 1)),
            "member_losses": [validation_loss(m, val) for m in models],
            "ensemble_loss": [validation_loss(EnsembleCausalLM(models[:k], combine), val)
                              for k in range(1, len(models) + 1)]}


def cmd_export(args: argparse.Namespace) -> int:
    from llmreg.regularizers.multipliers.export import export_plain

    result = export_plain(args.run_dir, args.out_dir, verify=args.verify, overwrite=args.overwrite)
    check = (f"; max |logit difference| {result.max_abs_logit_diff:.2e}" if result.max_abs_logit_diff is not None
             else "; not verified")
    print(f"done: merged the multipliers of {result.layers} layers from {result.source} into {result.out_dir}"
          + (" (separate LM head: the embeddings are no longer tied)" if result.untied else "") + check)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from llmreg.pretrain.sweep import plan_sweep, run_sweep

    plan = plan_sweep(args.recipe, args.overrides, args.grid, out=args.out, overwrite=args.overwrite)
    run_sweep(plan, overwrite=args.overwrite, say=_say)
    return 0


def cmd_testbed(args: argparse.Namespace) -> int:
    from llmreg.testbed.__main__ import main as testbed_main

    return testbed_main(args.rest)


def _launcher_args(parser: argparse.ArgumentParser) -> None:
    """The deepspeed launcher passes --local_rank=N before the subcommand (torch.distributed.launch did too);
    torchrun and accelerate set LOCAL_RANK instead. Accepted in either position and ignored: the trainer reads
    the environment."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    _launcher_args(parser)
    parser.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. trainer.learning_rate=1e-5 regularizers.0.lam=0.1")


def _say(*lines: str) -> None:
    from llmreg.recipe.run import is_main_process

    if is_main_process():
        print("\n".join(lines), flush=True)


def cmd_validate(args: argparse.Namespace) -> int:
    from llmreg.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    _say(f"ok: {args.recipe}", *(staged_summary(recipe) if _is_staged(recipe) else summary(recipe)))
    return 0


def _is_staged(recipe) -> bool:
    from llmreg.recipe.schema import StagedRecipe

    return isinstance(recipe, StagedRecipe)


def cmd_train_stages(args: argparse.Namespace, staged) -> int:
    from llmreg.recipe.stages import STAGE_EVAL_DIR, plan_stages, run_stages

    if args.resume:
        staged.resume = True
    plan_stages(staged, args.overwrite)  # fail before anything loads
    _say(f"training {args.recipe}: {len(staged.stages)} stages", *staged_summary(staged))
    result = run_stages(staged, overwrite=args.overwrite)
    _say(f"done: {len(result.trained)} stages trained"
         + (f", {len(result.skipped)} skipped ({', '.join(result.skipped)})" if result.skipped else "")
         + f"; outputs in {result.output_dir}",
         *(f"  stage {i + 1} final  {path}" for i, path in enumerate(result.final_dirs)),
         *([f"  stage_eval     {os.path.join(result.output_dir, STAGE_EVAL_DIR)}"] if result.stage_eval else []))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from llmreg.core.options import ConfigError
    from llmreg.recipe import load_recipe
    from llmreg.recipe.run import RECIPE_FILE, resume_checkpoint, train

    recipe = load_recipe(args.recipe, args.overrides)
    if _is_staged(recipe):
        return cmd_train_stages(args, recipe)
    if recipe.importance is not None:
        raise ConfigError(f"{args.recipe} has an `importance:` section: run it with `llmreg importance`")
    if args.resume:
        recipe.resume = True
    resume_from = resume_checkpoint(recipe, args.overwrite)  # fail before anything loads
    _say(f"training {args.recipe}" + (f", resuming from {resume_from}" if resume_from else ""), *summary(recipe))
    result = train(recipe, overwrite=args.overwrite)
    _say(
        f"done: {result.global_step} steps; outputs in {result.output_dir}",
        f"  recipe       {os.path.join(result.output_dir, RECIPE_FILE)}",
        f"  metrics      {os.path.join(result.output_dir, 'metrics.jsonl')}",
        f"  checkpoints  {', '.join(result.checkpoints) or '(none)'}",
        f"  final model  {result.final_dir}",
    )
    return 0


def cmd_importance(args: argparse.Namespace) -> int:
    from llmreg.core.options import ConfigError
    from llmreg.recipe import load_recipe
    from llmreg.recipe.run import FINAL_DIR, resume_checkpoint
    from llmreg.regularizers.forgetting.phase1 import run_importance

    recipe = load_recipe(args.recipe, args.overrides)
    if _is_staged(recipe):
        raise ConfigError(f"{args.recipe} has `stages:`; importance is recorded by a recipe without stages")
    if recipe.importance is None:
        raise ConfigError(f"{args.recipe} has no `importance:` section (method: si or ewc)")
    if recipe.importance.method == "si":
        resume_checkpoint(recipe, args.overwrite)  # fail before anything loads
    _say(f"recording {recipe.importance.method} importance with {args.recipe}", *summary(recipe))
    directory = run_importance(recipe, overwrite=args.overwrite)
    start = os.path.join(recipe.output_dir, FINAL_DIR) if recipe.importance.method == "si" else "the same model"
    _say(f"done: importance artifact in {directory}",
         f"  phase 2: start from {start} with regularizers: [{{name: forgetting_penalty, importance: "
         f"{recipe.importance.method}, artifact: {directory}}}]")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from llmreg.core.options import options_help
    from llmreg.core.registry import available

    for name, cls in available().items():
        print(f"{name}: {_first_doc_line(cls)}")
        for opt, type_name, default, help_text in options_help(cls.options_cls):
            print(f"    {opt} ({type_name}, default {default!r}): {help_text}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from llmreg.core.options import ConfigError
    from llmreg.eval.suite import load_suite

    suite = load_suite(args.suite)
    models = list(args.model)
    base = args.base or (models.pop(0) if len(models) > 1 else None)
    if base is None:
        raise ConfigError("eval: give --base, or at least two --model (the first is then the base)")
    for path in [base, *models]:  # before anything loads: a typo should not cost a model load
        _check_model_path(path)
    from llmreg.eval.run import cached_evaluate, evaluate_suite, forgetting_report, write_report

    print(f"evaluating base {base} on {args.suite}", flush=True)
    base_scores = cached_evaluate(suite, base, limit=args.limit, cache_dir=args.cache_dir)
    runs = {}
    for path in models:
        print(f"evaluating {path}", flush=True)
        runs[_run_name(path, runs)] = evaluate_suite(suite, path, limit=args.limit)
    files = write_report(forgetting_report(base_scores, runs, suite), args.out)
    print("done: " + ", ".join(files))
    return 0


def _check_model_path(path: str) -> None:
    """A path that exists must be a model folder; one that does not is an error offline (no hub) or when it
    is written as a path (./x, /x, a/b/c), since hub names are at most `org/name`."""
    from llmreg.core.options import ConfigError

    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"eval: {path} is not a model folder (no config.json)")
        from llmreg.regularizers.multipliers.export import refuse_wrapped

        refuse_wrapped(path, "eval")
        return
    if os.environ.get("HF_HUB_OFFLINE") or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ConfigError(f"eval: model path not found: {path}")


def _run_name(path: str, taken: dict) -> str:
    name = os.path.basename(os.path.normpath(path)) or path
    return name if name not in taken else f"{name}-{len(taken)}"


def _first_doc_line(cls: type) -> str:
    """The class docstring's first line, else its module's (a method module opens with what it is)."""
    doc = cls.__doc__ or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    lines = [line.strip() for line in doc.strip().splitlines()]
    return lines[0] if lines else ""


def staged_summary(staged) -> list[str]:
    """The shared settings of a staged recipe, then each stage's own lines."""
    from llmreg.recipe.stages import STAGE_EVAL_DIR

    lines = summary(staged.stages[0].recipe)
    shared = [line for line in lines if line.split()[0] in ("model", "tokenizer")]
    shared.append(f"  output_dir    {staged.output_dir}")
    if staged.stage_eval is not None:
        spec = staged.stage_eval
        shared.append(f"  stage_eval    {spec.suite} (limit {spec.limit}, batch_size {spec.batch_size}) -> "
                      f"{os.path.join(staged.output_dir, STAGE_EVAL_DIR)}")
    n = len(staged.stages)
    for stage in staged.stages:
        start = "the model above" if stage.index == 0 else f"stage {stage.index}'s final model"
        shared.append(f"  stage {stage.index + 1}/{n}: {stage.name} ({stage.recipe.trainer.kind}), from {start}, "
                      f"into {stage.recipe.output_dir}")
        shared += ["    " + line for line in summary(stage.recipe)
                   if line.split()[0] not in ("model", "tokenizer", "output_dir")]
        if stage.eval_task:
            shared.append(f"      eval_task     {stage.eval_task}")
    return shared


def summary(recipe) -> list[str]:
    """A few lines describing a validated recipe."""
    model = recipe.model.describe()
    tokenizer = recipe.tokenizer.name_or_path or f"builtin {recipe.tokenizer.builtin}"
    data = _source_text(recipe.data.train) + (f"; eval {_source_text(recipe.data.eval)}" if recipe.data.eval else "")
    # repr for strings like eos_token "\n" that would otherwise break the line
    trainer = ", ".join(f"{k}={v if not isinstance(v, str) or v.isprintable() else repr(v)}"
                        for k, v in recipe.trainer.args.items())
    regs = ", ".join(f"{r['name']}({', '.join(f'{k}={v}' for k, v in r.items() if k != 'name')})"
                     for r in recipe.regularizers) or "none"
    return [
        f"  model         {model} (dtype {recipe.model.dtype})",
        f"  tokenizer     {tokenizer}",
        f"  data          train {data}",
        f"  trainer       {recipe.trainer.kind}: {trainer}",
        f"  peft          {recipe.peft or 'none'}",
        f"  regularizers  {regs}",
        f"  output_dir    {recipe.output_dir}",
        *([f"  importance    {recipe.importance.method} -> {recipe.importance.output or 'output_dir/importance'}"]
          if recipe.importance is not None else []),
    ]


def _source_text(src) -> str:
    return src.path + (f" ({src.num_examples} examples, seed {src.seed})" if src.kind == "builtin" else "")


if __name__ == "__main__":
    sys.exit(main())
