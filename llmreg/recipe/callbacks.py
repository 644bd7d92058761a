"""`MetricsJsonlCallback`: every `on_log` event as one JSON line in `<output_dir>/metrics.jsonl`.

The file is plain data for plots and tests (`reg/<name>/<key>` metrics included,
since the trainer mixin merges them into the logs). On resume the lines logged
after the checkpoint's step are dropped first, because those steps run again;
a fresh run (step 0 at train begin) starts an empty file.
"""

from __future__ import annotations

import json
import math
import os

from transformers import TrainerCallback


class MetricsJsonlCallback(TrainerCallback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= state.global_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": state.epoch, **{k: _plain(v) for k, v in logs.items()}}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl file ([] when there is none)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _plain(value):
    """JSON has no NaN/inf or tensors; keep numbers as numbers and everything else as text."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if isinstance(value, (int, float, str, bool, type(None), list, dict)) else str(value)


class TrainBeginProbe(TrainerCallback):
    """Notes `on_train_begin`, which the Trainer calls after it built the optimizer and scheduler and loaded a
    checkpoint: an exception before it is a failure to start the run (llmreg.recipe.run.start_training)."""

    def __init__(self) -> None:
        self.begun = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.begun = True
