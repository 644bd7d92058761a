"""`llmreg train` that SIGKILLs itself at one injection point, for tests/test_fault_injection.py.

    python tests/workers/fault_worker.py POINT:STEP COMMAND llmreg-args...

COMMAND is `train` or `importance` (an si importance run trains like `train`).

POINT: `train` dies inside the optimizer step that would reach STEP + 1 (after the backward, mid-step);
`optimizer` dies while saving checkpoint-STEP after the model is written, before the optimizer state;
`regstate` dies after the Trainer's pieces, before llmreg_regularizers/rank0.pt; `marker` dies after every
piece, just before the completion marker. SIGKILL: no handler, no flush, no cleanup, like an OOM kill.
"""

from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, step: int) -> None:
    import transformers

    import llmreg.integrations.hf as hf

    def at(step_now: int) -> bool:
        return step_now == step

    if point == "train":
        original = transformers.Trainer.training_step

        def training_step(self, *args, **kwargs):
            loss = original(self, *args, **kwargs)
            if at(self.state.global_step):
                die()
            return loss

        transformers.Trainer.training_step = training_step
    elif point == "optimizer":
        original_opt = transformers.Trainer._save_optimizer_and_scheduler

        def save_optimizer(self, output_dir):
            if at(self.state.global_step):
                die()
            return original_opt(self, output_dir)

        transformers.Trainer._save_optimizer_and_scheduler = save_optimizer
    elif point == "regstate":
        original_reg = hf.RegularizedTrainerMixin._reg_save_state

        def save_reg(self, checkpoint_dir):
            if at(self.state.global_step):
                die()
            return original_reg(self, checkpoint_dir)

        hf.RegularizedTrainerMixin._reg_save_state = save_reg
    elif point == "marker":
        original_mark = hf.mark_complete

        def mark(checkpoint_dir, step_now, is_writer):
            if at(step_now):
                die()
            return original_mark(checkpoint_dir, step_now, is_writer)

        hf.mark_complete = mark
    else:
        raise SystemExit(f"unknown injection point {point}")


if __name__ == "__main__":
    point, step = sys.argv[1].split(":")
    install(point, int(step))
    from llmreg.cli import main

    sys.exit(main(sys.argv[2:]))
