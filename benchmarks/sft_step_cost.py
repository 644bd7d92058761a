"""Where an SFT step through `llmreg train` (TRL's SFTTrainer) spends time beyond a plain training loop (issue 18).

    python benchmarks/sft_step_cost.py [--recipe recipes/smollm2/gsm8k_sft.yaml] [--max-length 128] [--steps 3]

The recipe is built exactly as `llmreg train` builds it (llmreg.recipe.build.build_run), and its first batches
(TRL's tokenisation, completion mask and padding) feed every variant, so all see the same tensors:

- `plain`: `model(**batch).loss` (transformers' loss over the full logits), backward, AdamW step;
- `fused`: TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) computing only the per-token log-probs;
- `fused+metrics`: the same head with the outputs TRL's SFTTrainer asks for ("log_probs", "entropy", "is_top1":
  the per-step entropy and mean-token-accuracy metrics, computed over the 49k-vocabulary logits);
- `trainer`: `trainer.train()` itself (RegSFTTrainer: compute_loss with the metrics, gathers, logging hooks,
  gradient clipping, scheduler), timed per step by a callback.

Time is CPU time of the process (`time.process_time`, one thread: torch.set_num_threads(1)), not wall time, so
other jobs on the machine change it little; the median of the timed steps after `--warmup` untimed ones (Adam
allocates its state in the first step). Departure from step_overhead.py: no interleaving, one variant after the
other; CPU time is what makes that fair on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build(recipe_path: str, max_length: int, steps: int, out: str):
    """The recipe's trainer (not trained) and its first `steps` batches."""
    import yaml

    from llmreg.recipe.build import build_run
    from llmreg.recipe.validate import validate_recipe

    raw = yaml.safe_load(Path(recipe_path).read_text())
    raw["trainer"].update(max_length=max_length, max_steps=steps, disable_tqdm=True, save_strategy="no")
    raw["trainer"]["logging_steps"] = 1
    raw["data"]["train"]["max_examples"] = 4 * steps * 2
    raw["output_dir"] = out
    trainer = build_run(validate_recipe(raw, recipe_path)).trainer
    batches = []
    for batch in trainer.get_train_dataloader():
        batches.append({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        if len(batches) == steps:
            break
    return trainer, batches


def loop_times(model, batches: list[dict], forward) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for batch in batches:
        t0 = time.process_time()
        forward(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - t0)
    return times


def fresh(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()


def plain_loss(model, batch):
    return model(**batch).loss


def fused_loss(model, batch):
    return model(**batch, fused_lm_head=True).loss


def trainer_times(trainer) -> list[float]:
    from transformers import TrainerCallback

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.process_time() - self.t0)

    trainer.add_callback(Clock())
    trainer.train()
    return times


def main(argv: list[str] | None = None) -> int:
    from trl.trainer.utils import add_fused_lm_head

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=str(REPO / "recipes" / "smollm2" / "gsm8k_sft.yaml"))
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    n = args.warmup + args.steps
    out = f"/tmp/sft_step_cost_{os.getpid()}"
    trainer, batches = build(args.recipe, args.max_length, n, out)
    # fresh copies from the trainer's own model folder: TRL patched trainer.model's forward with a closure over
    # that very model, so a deepcopy of it would still run (and train) the original
    folder = trainer.model.config._name_or_path
    results = {"plain": loop_times(fresh(folder), batches, plain_loss)}
    for name, outputs in (("fused", ("log_probs",)), ("fused+metrics", ("log_probs", "entropy", "is_top1"))):
        model = fresh(folder)
        add_fused_lm_head(model, outputs=outputs)
        results[name] = loop_times(model, batches, fused_loss)
    results["trainer"] = trainer_times(trainer)
    tokens = [int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches]
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    summary = {k: statistics.median(v[args.warmup :]) for k, v in results.items()}
    print(f"batches {shapes}, tokens {tokens}, load average {os.getloadavg()[0]:.1f}")
    for k, v in summary.items():
        print(f"{k:14s} median CPU s/step {v:6.2f}  ratio to plain {v / summary['plain']:.3f}  all {results[k]}")
    if args.json:
        record = {"median_cpu_s": summary, "all_cpu_s": results, "shapes": shapes, "tokens": tokens, **vars(args)}
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
