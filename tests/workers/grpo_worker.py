"""GRPO with regularizers for a few steps, one process or `torchrun --nproc_per_node 2` (plain DDP or DeepSpeed).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/workers/grpo_worker.py --zero 0|2|3 --out DIR ...

Writes (rank 0) `<out>/result.pt`: per-step losses and reg/ metrics, the final full weights (gathered under
ZeRO-3), and from every rank the global thresholds lp_reg put into its generation batches.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from worker_utils import gathered_weights, leave

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def digit_count_reward(completions, **_):
    return [float(sum(ch.isdigit() for ch in text)) for text in completions]


def main() -> int:
    """Train, write result.pt on rank 0; returns the world size."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", type=int, default=0, choices=[0, 2, 3])
    ap.add_argument("--regularizers", default="[]")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--steps-per-generation", type=int, default=None, help="2: off-policy, TRL computes old log-probs")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.zero:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # docs/architecture.md, trap 10: before the config
    import trl

    import llmreg
    from llmreg.data import build_char_tokenizer, make_builtin_dataset, tiny_llama

    tok = build_char_tokenizer()
    args = trl.GRPOConfig(
        output_dir=os.path.join(a.out, "trainer"),
        max_steps=a.steps,
        per_device_train_batch_size=8 // world // (a.steps_per_generation or 1),
        num_generations=2,
        max_completion_length=6,
        beta=0.0,
        epsilon=1.0,
        epsilon_high=9.0,
        loss_type="dapo",
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        deepspeed=os.path.join(REPO, "ds_configs", f"zero{a.zero}.json") if a.zero else None,
        steps_per_generation=a.steps_per_generation,
    )
    model = tiny_llama(vocab_size=len(tok), seed=0)
    trainer = llmreg.RegGRPOTrainer(
        model=model,
        args=args,
        processing_class=tok,
        reward_funcs=digit_count_reward,
        train_dataset=make_builtin_dataset(format="prompt_only", num_examples=64),
        regularizers=json.loads(a.regularizers),
    )
    thresholds = []
    for reg in trainer.reg_stack:
        original = reg.on_generation_batch

        def record(batch, tr, _orig=original):
            _orig(batch, tr)
            if "lp_reg_threshold" in batch:
                thresholds.append(float(batch["lp_reg_threshold"][0]))

        reg.on_generation_batch = record
    trainer.train()
    gathered = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(gathered, thresholds)
    else:
        gathered = [thresholds]
    weights = gathered_weights(trainer.model, a.zero)
    if args.process_index == 0:
        logs = [h for h in trainer.state.log_history if "loss" in h]
        metrics = [{k: v for k, v in h.items() if k.startswith("reg/")} for h in logs]
        torch.save(
            {
                "losses": [h["loss"] for h in logs],
                "metrics": metrics,
                "weights": weights,
                "thresholds": gathered,
                "world": world,
            },
            os.path.join(a.out, "result.pt"),
        )
    return world


if __name__ == "__main__":
    leave(main())
