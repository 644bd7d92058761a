"""A whole training run from a validated recipe: what `llmreg train` does.

Output directory layout:

    <output_dir>/recipe.yaml        the resolved recipe (rerun it with `llmreg train`)
    <output_dir>/metrics.jsonl      one JSON object per logging event
    <output_dir>/checkpoint-N/      the trainer's checkpoints (+ llmreg_regularizers/rank<r>.pt)
    <output_dir>/final/             the final model and tokenizer
    <output_dir>/final_eval.json    pretrain recipes: the final validation loss (written by the data mode's
                                    after_train, llmreg.pretrain.sweep.write_final_eval)

A fresh run refuses an output directory that already holds checkpoints: the
trainer would mix them with the new run's, and a later `--resume` would pick
whichever has the highest step. `overwrite=True` (`llmreg train --overwrite`)
first deletes the earlier run's files (only the names above, and `init/`).

A recipe with `stages:` is a `StagedRecipe`: `llmreg.recipe.stages.run_stages` runs it, calling `train` once
per stage.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

from llmreg.core.options import ConfigError
from llmreg.recipe.data_modes import recipe_data_mode
from llmreg.recipe.errors import one_line
from llmreg.recipe.loader import dump_recipe
from llmreg.recipe.schema import Recipe

RECIPE_FILE = "recipe.yaml"
FINAL_DIR = "final"
FINAL_EVAL_FILE = "final_eval.json"  # written by the pretrain data mode after training (llmreg.recipe.data_modes)


@dataclass
class RunResult:
    output_dir: str
    final_dir: str
    resumed_from: str | None
    checkpoints: list[str]
    global_step: int
    trainer: Any = None  # the trainer that ran (for a caller that goes on from it, e.g. `llmreg importance`)


def is_main_process() -> bool:
    """Rank 0 of torchrun / accelerate / deepspeed launches (they all set RANK), or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0


def checkpoints_in(output_dir: str) -> list[str]:
    """checkpoint-N directories, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        d
        for d in os.listdir(output_dir)
        if re.fullmatch(r"checkpoint-\d+", d) and os.path.isdir(os.path.join(output_dir, d))
    ]
    return sorted(found, key=lambda d: int(d.split("-")[1]))


def split_checkpoints(output_dir: str) -> tuple[list[str], list[str]]:
    """(complete, incomplete) checkpoint-N names in `output_dir`, by step; a checkpoint is complete once its
    marker is written, after all its pieces (llmreg.integrations.checkpoints)."""
    from llmreg.integrations.checkpoints import is_complete

    found = checkpoints_in(output_dir)
    complete = [c for c in found if is_complete(os.path.join(output_dir, c))]
    return complete, [c for c in found if c not in complete]


def skipped_checkpoints(output_dir: str, resume_from: str) -> list[str]:
    """The incomplete checkpoints after `resume_from` (a run killed while saving them), which resuming skips."""
    step = int(os.path.basename(resume_from).split("-")[1])
    return [c for c in split_checkpoints(output_dir)[1] if int(c.split("-")[1]) > step]


def skipped_note(output_dir: str, resume_from: str) -> str:
    """' (skipping incomplete checkpoint-9, ...)' for the resume message, or ''."""
    skipped = skipped_checkpoints(output_dir, resume_from)
    return f" (skipping incomplete {', '.join(skipped)}: the run stopped while saving)" if skipped else ""


def resume_checkpoint(recipe: Recipe, overwrite: bool = False) -> str | None:
    """The checkpoint to resume from: the newest complete one (None for a fresh run); a ConfigError where
    neither is possible."""
    if overwrite:
        if recipe.resume:
            raise ConfigError("resume and overwrite exclude each other: continue the earlier run or replace it")
        return None
    complete, incomplete = split_checkpoints(recipe.output_dir)
    if recipe.resume:
        if not complete:
            what = (
                f"complete checkpoint (only incomplete ones: {', '.join(incomplete)})" if incomplete else "checkpoint"
            )
            raise ConfigError(f"resume: no {what} in {recipe.output_dir} to resume from; train without --resume first")
        return os.path.join(recipe.output_dir, complete[-1])
    if complete or incomplete:
        raise ConfigError(
            f"output_dir {recipe.output_dir} already holds {(complete or incomplete)[-1]} from an earlier "
            "run: add --resume to continue it, --overwrite to replace it, or set "
            "output_dir=<another dir>"
        )
    return None


def drop_skipped_checkpoints(output_dir: str, resume_from: str) -> list[str]:
    """Delete the incomplete checkpoints after `resume_from` (main process): the resumed run writes them again
    at the same steps, and a half-written one must not outlive it or be counted by save_total_limit."""
    skipped = skipped_checkpoints(output_dir, resume_from)
    if is_main_process():
        for name in skipped:
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return skipped


def clear_previous_run(output_dir: str) -> None:
    """Delete what an earlier run wrote to `output_dir` (its known outputs only)."""
    from llmreg.recipe.build import METRICS_FILE
    from llmreg.recipe.models import INIT_DIR

    for name in [*checkpoints_in(output_dir), FINAL_DIR, INIT_DIR, METRICS_FILE, RECIPE_FILE, FINAL_EVAL_FILE]:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path):
            os.remove(path)


def start_training(trainer: Any, resume_from: str | None) -> None:
    """`trainer.train(...)` behind the error boundary of starting a run: an exception before the first step
    (optimizer construction, loading the checkpoint, the regularizers' on_prepared) is a one-line ConfigError
    naming `resume` or `trainer`; one raised later during training propagates unchanged."""
    from llmreg.recipe.callbacks import TrainBeginProbe

    probe = TrainBeginProbe()
    trainer.add_callback(probe)
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except (ConfigError, AssertionError):  # already one line / a bug that keeps its traceback
        raise
    except Exception as err:
        if probe.begun:
            raise
        where = "resume" if resume_from else "trainer"
        raise ConfigError(f"{where}: {type(err).__name__}: {one_line(err)}") from err
    finally:
        trainer.remove_callback(probe)


def train(recipe: Recipe, overwrite: bool = False, extra_regularizers: list | None = None) -> RunResult:
    """Build and train; writes the layout above. Call `resume_checkpoint` first to fail early.

    `extra_regularizers`: regularizer objects appended to the recipe's (e.g. the importance recorder)."""
    from llmreg.recipe.build import build_run

    if not isinstance(recipe, Recipe):
        raise TypeError(
            f"train() takes one Recipe, got {type(recipe).__name__}; a recipe with stages runs with "
            "llmreg.recipe.stages.run_stages"
        )
    resume_from = resume_checkpoint(recipe, overwrite)
    if overwrite and is_main_process():  # before build_run: a DPO/GRPO run writes init/ there
        clear_previous_run(recipe.output_dir)
    if resume_from is not None:
        skipped = drop_skipped_checkpoints(recipe.output_dir, resume_from)
        if skipped and is_main_process():
            print(f"resuming from {os.path.basename(resume_from)}; removed incomplete {', '.join(skipped)}", flush=True)
    run = build_run(recipe, extra_regularizers=extra_regularizers)
    if is_main_process():
        os.makedirs(recipe.output_dir, exist_ok=True)
        dump_recipe(recipe, os.path.join(recipe.output_dir, RECIPE_FILE))
    start_training(run.trainer, resume_from)
    final_dir = os.path.join(recipe.output_dir, FINAL_DIR)
    run.trainer.save_model(final_dir)  # on every rank: gathers ZeRO-3 shards; writes on the main process
    if run.trainer.is_world_process_zero():
        run.tokenizer.save_pretrained(final_dir)
    mode = recipe_data_mode(recipe)
    if mode is not None and mode.after_train is not None:  # pretrain: final_eval.json (the final validation loss)
        mode.after_train(run.trainer, recipe)
    return RunResult(
        output_dir=recipe.output_dir,
        final_dir=final_dir,
        resumed_from=resume_from,
        checkpoints=checkpoints_in(recipe.output_dir),
        global_step=run.trainer.state.global_step,
        trainer=run.trainer,
    )
