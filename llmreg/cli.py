"""`llmreg` command line: train, validate, list.

    llmreg train RECIPE [key=value ...] [--resume | --overwrite]
    llmreg importance RECIPE [key=value ...] [--resume | --overwrite]
    llmreg validate RECIPE [key=value ...]
    llmreg list [NAME]
    llmreg eval --suite SUITE --model PATH [--model PATH ...] [--name NAME ...] [--base PATH] --out DIR [--limit N]
    llmreg testbed {build,forget} ...   (`llmreg testbed --help`)
    llmreg export RUN_DIR OUT_DIR [--overwrite] [--no-verify]
    llmreg merge --base MODEL --tuned RUN_OR_MODEL --alpha 0.25,0.5,0.75 --out DIR [--overwrite]
    llmreg sweep RECIPE [key=value ...] --grid key=v1,v2 [key=v1,v2 ...] [--out DIR] [--overwrite]
                 [--suite SUITE [--base MODEL] [--merge-alphas 0.25,0.5] [--limit N]]
    llmreg ensemble MODEL [MODEL ...] (--recipe RECIPE [--set key=value ...] | --suite SUITE) [--combine ...]

`train` also runs under `torchrun --nproc_per_node N -m llmreg.cli train ...`,
`accelerate launch -m llmreg.cli train ...` and the `deepspeed` launcher: the
trainer does the distribution, and only rank 0 prints. A bad recipe exits with
status 2 and one line `error: <message>` on stderr, before anything is loaded.
A recipe with `stages:` trains its stages in turn (llmreg.recipe.stages); `validate` shows each stage.

This module parses the arguments and dispatches to `llmreg.commands` (one thin function per command); what each
command does lives in llmreg.recipe (train,
validate, importance, the printed summaries), llmreg.eval.compare (eval), llmreg.eval.merge (merge),
llmreg.pretrain (sweep, ensemble),
llmreg.regularizers.multipliers.export (export) and llmreg.testbed (testbed).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from llmreg.commands import (
    cmd_ensemble,
    cmd_eval,
    cmd_export,
    cmd_importance,
    cmd_list,
    cmd_merge,
    cmd_sweep,
    cmd_testbed,
    cmd_train,
    cmd_validate,
)

EXIT_CONFIG_ERROR = 2
COMMANDS = ("train", "importance", "validate", "list", "eval", "testbed", "export", "merge", "sweep", "ensemble")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    from llmreg.core.options import ConfigError
    from llmreg.integrations.deepspeed import quiet_cpu_fallback_notice
    from llmreg.recipe.errors import one_line_config_warnings

    quiet_cpu_fallback_notice()
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
    if args.command == "testbed":  # its own parser reads everything after it, `--help` included
        args.rest = [*extra, *args.rest]
        return args
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
        _add_merge,
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
    imp.add_argument("--resume", action="store_true", help="si: continue from the last checkpoint in output_dir")
    imp.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    imp.set_defaults(func=cmd_importance)


def _add_validate(sub) -> None:
    validate = sub.add_parser("validate", help="check a recipe without loading a model or data")
    _recipe_args(validate)
    validate.add_argument("--resume", action="store_true", help="check as `train --resume` would")
    validate.add_argument("--overwrite", action="store_true", help="check as `train --overwrite` would")
    validate.set_defaults(func=cmd_validate)


def _add_list(sub) -> None:
    lst = sub.add_parser(
        "list",
        help="the registered regularizers: a table (trainer kinds, PEFT, ZeRO-3), then their options",
        description="A table of the registered regularizers (trainer kinds each supports, whether it works with "
        "PEFT and with DeepSpeed ZeRO-3), then every option with its type, default and help.",
    )
    lst.add_argument("name", nargs="?", help="show only this regularizer's options")
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
    ev.add_argument(
        "--name",
        action="append",
        metavar="NAME",
        help="the run's name in the report, one per fine-tuned --model in order (default: the shortest part of "
        "each path that tells the models apart)",
    )
    ev.add_argument("--base", metavar="PATH", help="the model before fine-tuning (default: the first --model)")
    ev.add_argument("--out", required=True, metavar="DIR", help="folder for the report files")
    ev.add_argument("--limit", type=int, metavar="N", help="at most N >= 1 documents per task (quick runs)")
    ev.add_argument("--cache-dir", help="base-score cache (default ~/.cache/llmreg/eval)")
    ev.set_defaults(func=cmd_eval, overrides=[])


def _add_testbed(sub) -> None:
    tb = sub.add_parser(
        "testbed", help="build the CPU forgetting testbed, or fine-tune it on its new skill", add_help=False
    )
    tb.add_argument("rest", nargs=argparse.REMAINDER, help="build | forget PATH ... (`llmreg testbed --help`)")
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


def _add_merge(sub) -> None:
    mg = sub.add_parser(
        "merge",
        help="interpolate a fine-tune toward its base (WiSE-FT): one plain model per alpha",
        description="Write (1 - alpha) * base + alpha * tuned for each alpha to OUT/alpha-<alpha>/ with the "
        "tokenizer (llmreg.eval.merge); a PEFT adapter is merged into the base first.",
    )
    mg.add_argument("--base", required=True, metavar="MODEL", help="model folder, hub name or DIR/NAME.gguf")
    mg.add_argument("--tuned", required=True, metavar="RUN_OR_MODEL", help="a run (its final/), model or adapter")
    mg.add_argument("--alpha", required=True, metavar="A,B,...", help="weights of the tuned model, e.g. 0.25,0.5")
    mg.add_argument("--out", required=True, metavar="DIR", help="folder for the alpha-<alpha>/ models")
    mg.add_argument("--overwrite", action="store_true", help="replace existing alpha-<alpha>/ folders")
    mg.set_defaults(func=cmd_merge, overrides=[])


def _add_sweep(sub) -> None:
    sw = sub.add_parser(
        "sweep",
        help="run a grid of a recipe, one run after another (resumable); --suite: gain vs forgetting of each point",
        description="Train every point of the grid (skipping finished ones), then tabulate the "
        "final validation loss and check the best point's grid neighbours "
        "(llmreg.pretrain.sweep). With --suite, any recipe: score every point (and its WiSE-FT merges with the "
        "base) on the suite against the base, into <out>/tradeoff/ (llmreg.pretrain.tradeoff). "
        "Base overrides go before --grid.",
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
    sw.add_argument("--suite", metavar="SUITE", help="eval suite YAML: gain vs forgetting table and Pareto plot")
    sw.add_argument("--base", metavar="MODEL", help="--suite: the model to compare with (default: the recipe's)")
    sw.add_argument(
        "--merge-alphas", metavar="A,B,...", help="--suite: also score (1 - a) * base + a * point, a in [0, 1]"
    )
    sw.add_argument("--limit", type=int, metavar="N", help="--suite: at most N >= 1 documents per task")
    sw.add_argument("--cache-dir", help="--suite: score cache (default ~/.cache/llmreg/eval)")
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
    en.add_argument("--limit", type=int, metavar="N", help="--suite: at most N >= 1 documents per task")
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


if __name__ == "__main__":
    sys.exit(main())
