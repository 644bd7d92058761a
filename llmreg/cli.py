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

This module parses the arguments and dispatches: what each command does lives in llmreg.recipe (train,
validate, importance, the printed summaries), llmreg.eval.compare (eval), llmreg.pretrain (sweep, ensemble),
llmreg.regularizers.multipliers.export (export) and llmreg.testbed (testbed).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

EXIT_CONFIG_ERROR = 2
COMMANDS = ("train", "importance", "validate", "list", "eval", "testbed", "export", "sweep", "ensemble")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    from llmreg.core.options import ConfigError
    from llmreg.recipe.errors import one_line_config_warnings

    debug = getattr(args, "debug", False) or os.environ.get("LLMREG_DEBUG", "") not in ("", "0")
    with warnings.catch_warnings():
        one_line_config_warnings()
        try:
            return args.func(args)
        except ConfigError as err:  # raised before anything loads, or by the boundary of building a run
            if debug:
                import traceback

                traceback.print_exception(err)
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for add in (
        _add_train,
        _add_importance,
        _add_validate,
        _add_list,
        _add_eval,
        _add_testbed,
        _add_export,
        _add_sweep,
        _add_ensemble,
    ):
        add(sub)
    return parser


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="validate a recipe, then train", description="Validate, then train.")
    _recipe_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier run's checkpoints, metrics and final model in output_dir first",
    )
    train.set_defaults(func=cmd_train)


def _add_importance(sub) -> None:
    imp = sub.add_parser(
        "importance",
        help="phase 1 of forgetting_penalty: record importance, write the artifact",
        description="Run a recipe with an `importance:` section (si: train on general data and "
        "record the SI path integral; ewc: the diagonal Fisher, no training) and "
        "write <output_dir>/importance for forgetting_penalty's `artifact`.",
    )
    _recipe_args(imp)
    imp.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    imp.set_defaults(func=cmd_importance)


def _add_validate(sub) -> None:
    validate = sub.add_parser("validate", help="check a recipe without loading a model or data")
    _recipe_args(validate)
    validate.add_argument("--resume", action="store_true", help="check as `train --resume` would")
    validate.add_argument("--overwrite", action="store_true", help="check as `train --overwrite` would")
    validate.set_defaults(func=cmd_validate)


def _add_list(sub) -> None:
    lst = sub.add_parser("list", help="show the registered regularizers and their options")
    lst.set_defaults(func=cmd_list)


def _add_eval(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="evaluate fine-tuned models against a base on a suite: gain vs forgetting",
        description="Run a suite (eval/suites/*.yaml) with lm-eval on the base and each model; "
        "write forgetting_report.{json,md}, deltas.png and pareto.png into --out.",
    )
    ev.add_argument("--suite", required=True, help="suite YAML, e.g. eval/suites/stories260k.yaml")
    ev.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="PATH",
        help="fine-tuned model directory (or hub name when online); repeat for several runs",
    )
    ev.add_argument("--base", metavar="PATH", help="the model before fine-tuning (default: the first --model)")
    ev.add_argument("--out", required=True, metavar="DIR", help="folder for the report files")
    ev.add_argument("--limit", type=int, help="at most N documents per task (quick runs)")
    ev.add_argument("--cache-dir", help="base-score cache (default ~/.cache/llmreg/eval)")
    ev.set_defaults(func=cmd_eval, overrides=[])


def _add_testbed(sub) -> None:
    tb = sub.add_parser(
        "testbed", help="build the CPU forgetting testbed, or fine-tune it on its new skill", add_help=False
    )
    tb.add_argument("rest", nargs=argparse.REMAINDER, help="build | forget PATH ... (see --help after it)")
    tb.set_defaults(func=cmd_testbed, overrides=[])


def _add_export(sub) -> None:
    ex = sub.add_parser(
        "export",
        help="fold learnable multipliers into plain weights (loads with stock transformers)",
        description="Merge the `multipliers` regularizer's lrm_* parameters of RUN_DIR/final (or of "
        "the model folder RUN_DIR) into the weights and write a plain model to OUT_DIR; "
        "checks that the logits on a fixed batch are unchanged.",
    )
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (uses its final/) or a model folder")
    ex.add_argument("out_dir", metavar="OUT_DIR", help="folder for the plain model")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    ex.add_argument("--no-verify", dest="verify", action="store_false", help="skip the logit comparison")
    ex.set_defaults(func=cmd_export, overrides=[])


def _add_sweep(sub) -> None:
    sw = sub.add_parser(
        "sweep",
        help="run a grid of a pretrain recipe, one run after another (resumable)",
        description="Train every point of the grid (skipping finished ones), then tabulate the "
        "final validation loss and check the best point's grid neighbours "
        "(llmreg.pretrain.sweep). Base overrides go before --grid.",
    )
    _recipe_args(sw)
    sw.add_argument(
        "--grid",
        nargs="+",
        required=True,
        metavar="key=v1,v2",
        help="one axis per argument, e.g. trainer.weight_decay=0.1,0.4,1.6 trainer.num_train_epochs=4,8",
    )
    sw.add_argument("--out", metavar="DIR", help="sweep folder (default <output_dir>/sweep)")
    sw.add_argument("--overwrite", action="store_true", help="redo every point, finished ones included")
    sw.set_defaults(func=cmd_sweep)


def _add_ensemble(sub) -> None:
    en = sub.add_parser(
        "ensemble",
        help="evaluate K checkpoints as one model (averaged logits or probabilities)",
        description="Validation loss of the first k members for k = 1..K on a pretrain recipe's "
        "held-out blocks (--recipe), or the ensemble's scores on an eval suite "
        "(--suite, lm-eval). Members: run folders (their final/) or model folders.",
    )
    en.add_argument("members", nargs="+", metavar="MODEL", help="run output_dirs (final/ is used) or model folders")
    what = en.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", metavar="RECIPE", help="a recipe with data.pretrain: its validation blocks")
    what.add_argument("--suite", metavar="SUITE", help="an eval suite YAML (eval/suites/...)")
    en.add_argument("--set", nargs="+", default=[], metavar="key=value", help="overrides of --recipe")
    en.add_argument(
        "--combine",
        choices=("logits", "probs"),
        default="logits",
        help="average the logits (default, product of experts) or the probabilities (mixture)",
    )
    en.add_argument("--limit", type=int, help="--suite: at most N documents per task")
    en.add_argument("--out", metavar="FILE", help="also write the results as JSON")
    en.set_defaults(func=cmd_ensemble, overrides=[])


def _launcher_args(parser: argparse.ArgumentParser) -> None:
    """The deepspeed launcher passes --local_rank=N before the subcommand (torch.distributed.launch did too);
    torchrun and accelerate set LOCAL_RANK instead. Accepted in either position and ignored: the trainer reads
    the environment."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks (also LLMREG_DEBUG=1)"
    )


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    _launcher_args(parser)
    parser.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. trainer.learning_rate=1e-5 regularizers.0.lam=0.1",
    )


def _say(*lines: str) -> None:
    from llmreg.recipe.run import is_main_process

    if is_main_process():
        print("\n".join(lines), flush=True)


def cmd_validate(args: argparse.Namespace) -> int:
    from llmreg.recipe.preflight import load_and_check
    from llmreg.recipe.summary import describe

    recipe, _ = load_and_check(args.recipe, args.overrides, args.resume, args.overwrite)  # what train checks
    _say(f"ok: {args.recipe}", *describe(recipe))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from llmreg.recipe.importance import refuse_importance_section
    from llmreg.recipe.preflight import load_and_check
    from llmreg.recipe.run import skipped_note, train
    from llmreg.recipe.schema import StagedRecipe
    from llmreg.recipe.summary import run_lines, summary

    recipe, start = load_and_check(args.recipe, args.overrides, args.resume, args.overwrite)  # fail before loading
    if isinstance(recipe, StagedRecipe):
        return cmd_train_stages(args, recipe)
    refuse_importance_section(recipe, args.recipe)
    _say(
        f"training {args.recipe}"
        + (f", resuming from {start}{skipped_note(recipe.output_dir, start)}" if start else ""),
        *summary(recipe),
    )
    _say(*run_lines(train(recipe, overwrite=args.overwrite)))
    return 0


def cmd_train_stages(args: argparse.Namespace, staged) -> int:
    from llmreg.recipe.stages import run_stages
    from llmreg.recipe.summary import staged_summary, stages_lines

    _say(f"training {args.recipe}: {len(staged.stages)} stages", *staged_summary(staged))
    _say(*stages_lines(run_stages(staged, overwrite=args.overwrite)))
    return 0


def cmd_importance(args: argparse.Namespace) -> int:
    from llmreg.recipe.importance import check_importance_recipe, phase2_lines, run_importance
    from llmreg.recipe.preflight import load_and_check
    from llmreg.recipe.summary import summary

    recipe, _ = load_and_check(args.recipe, args.overrides, overwrite=args.overwrite)
    check_importance_recipe(recipe, args.recipe, args.overwrite)  # a recipe without `importance:` is refused
    _say(f"recording {recipe.importance.method} importance with {args.recipe}", *summary(recipe))
    _say(*phase2_lines(recipe, run_importance(recipe, overwrite=args.overwrite)))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from llmreg.core.options import options_help
    from llmreg.core.registry import available

    for name, cls in available().items():
        print(f"{name}: {_first_doc_line(cls)}")
        for opt, type_name, default, help_text in options_help(cls.options_cls):
            print(f"    {opt} ({type_name}, default {default!r}): {help_text}")
    return 0


def _first_doc_line(cls: type) -> str:
    """The class docstring's first line, else its module's (a method module opens with what it is)."""
    doc = cls.__doc__ or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    lines = [line.strip() for line in doc.strip().splitlines()]
    return lines[0] if lines else ""


def cmd_eval(args: argparse.Namespace) -> int:
    from llmreg.eval.compare import compare_to_base, pick_base
    from llmreg.eval.suite import load_suite
    from llmreg.recipe.models import check_model_path

    suite = load_suite(args.suite)
    base, models = pick_base(args.model, args.base)
    for path in [base, *models]:  # before anything loads: a typo should not cost a model load
        check_model_path(path, "eval")
    files = compare_to_base(suite, args.suite, base, models, args.out, limit=args.limit, cache_dir=args.cache_dir)
    print("done: " + ", ".join(files))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llmreg.regularizers.multipliers.export import export_plain

    result = export_plain(args.run_dir, args.out_dir, verify=args.verify, overwrite=args.overwrite)
    check = (
        f"; max |logit difference| {result.max_abs_logit_diff:.2e}"
        if result.max_abs_logit_diff is not None
        else "; not verified"
    )
    print(
        f"done: merged the multipliers of {result.layers} layers from {result.source} into {result.out_dir}"
        + (" (separate LM head: the embeddings are no longer tied)" if result.untied else "")
        + check
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from llmreg.pretrain.sweep import plan_sweep, run_sweep

    plan = plan_sweep(args.recipe, args.overrides, args.grid, out=args.out, overwrite=args.overwrite)
    run_sweep(plan, overwrite=args.overwrite, say=_say)
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    import json

    from llmreg.pretrain.ensemble_scores import member_folders

    members = member_folders(args.members)  # before anything loads
    if args.recipe is not None:
        from llmreg.pretrain.ensemble_scores import ensemble_validation, validation_lines, validation_recipe

        recipe = validation_recipe(args.recipe, [*args.set, *args.overrides])
        result = ensemble_validation(recipe, members, args.combine)
        _say(*validation_lines(result))
    else:
        from llmreg.pretrain.ensemble_scores import ensemble_suite_scores

        result = ensemble_suite_scores(args.suite, members, args.combine, args.limit)
        _say(*(f"  {task}: {value:.4g}" for task, value in result["scores"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        _say(f"wrote {args.out}")
    return 0


def cmd_testbed(args: argparse.Namespace) -> int:
    from llmreg.testbed.__main__ import main as testbed_main

    return testbed_main(args.rest)


if __name__ == "__main__":
    sys.exit(main())
