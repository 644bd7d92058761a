"""One function per `llmreg` command, called by `llmreg.cli` with the parsed arguments: each checks what it can
before anything loads, calls the module that does the work, and prints what the user needs to know (rank 0 only).
Library imports stay inside the functions so `llmreg --help` and `llmreg list` start fast."""

from __future__ import annotations

import argparse


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

    recipe, _ = load_and_check(args.recipe, args.overrides, resume=args.resume, overwrite=args.overwrite)
    # a recipe without `importance:` is refused; an si run may resume from its last complete checkpoint
    resume_from = check_importance_recipe(recipe, args.recipe, args.overwrite)
    resuming = f", resuming from {resume_from}" if resume_from else ""
    _say(f"recording {recipe.importance.method} importance with {args.recipe}{resuming}", *summary(recipe))
    _say(*phase2_lines(recipe, run_importance(recipe, overwrite=args.overwrite)))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from llmreg.recipe.listing import registry_lines

    print("\n".join(registry_lines(args.name)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from llmreg.eval.compare import check_limit, compare_to_base, pick_base, run_names
    from llmreg.eval.suite import load_suite
    from llmreg.recipe.models import check_model_path

    check_limit(args.limit)
    suite = load_suite(args.suite)
    base, models = pick_base(args.model, args.base)
    for path in [base, *models]:  # before anything loads: a typo should not cost a model load
        check_model_path(path, "eval")
    run_names(models, args.name)  # a wrong count of --name fails before anything loads
    files = compare_to_base(
        suite, args.suite, base, models, args.out, limit=args.limit, cache_dir=args.cache_dir, names=args.name
    )
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


def cmd_merge(args: argparse.Namespace) -> int:
    from llmreg.eval.merge import merge, plan_merge

    plan = plan_merge(args.base, args.tuned, args.alpha, args.out, overwrite=args.overwrite)  # before loading
    print("done: " + ", ".join(merge(plan)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from llmreg.pretrain.sweep import plan_sweep, run_sweep
    from llmreg.pretrain.tradeoff import check_base, check_tradeoff, run_tradeoff
    from llmreg.recipe.run import is_main_process

    # --suite: the points (and their WiSE-FT merges) scored against the base; checked before anything loads
    spec = check_tradeoff(args.suite, args.base, args.merge_alphas, args.limit, args.cache_dir)
    plan = plan_sweep(
        args.recipe, args.overrides, args.grid, out=args.out, overwrite=args.overwrite, any_recipe=spec is not None
    )
    if spec is not None:
        check_base(plan, spec)
    run_sweep(plan, overwrite=args.overwrite, say=_say)
    if spec is not None and is_main_process():  # lm-eval runs on one process
        _say("done: " + ", ".join(run_tradeoff(plan, spec, say=_say)))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    import json

    from llmreg.eval.compare import check_limit
    from llmreg.pretrain.ensemble_scores import member_folders

    check_limit(args.limit)
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
