"""Train a tiny Llama for a few steps, single-process or under DeepSpeed, and dump what the tests compare.

Run directly for one process (`--zero 0`), or under
`DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/workers/train_worker.py --zero 2|3 ...`.
Writes (rank 0) `<out>/result.pt`: per-step losses, the final full weights (gathered under ZeRO-3),
the optimizer's groups, and per-rank sizes of the regularizers' stored tensors.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from worker_utils import gathered_weights, leave

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", type=int, default=0, choices=[0, 2, 3])
    ap.add_argument("--regularizers", default="[]", help="JSON list of regularizer specs")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--peft", action="store_true", help="train a LoRA adapter (q_proj, v_proj) instead of full weights")
    ap.add_argument("--importance-out", default=None, help="write the si_importance recorder's artifact here")
    ap.add_argument("--save-final", default=None, help="trainer.save_model() into this folder (all ranks)")
    return ap.parse_args()


def optimizer_groups_by_name(trainer) -> list[dict]:
    """[{"weight_decay", "names"}] per optimizer group, read from the optimizer that really steps."""
    name_of = {id(p): n for n, p in trainer.model.named_parameters()}
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # accelerate wrapper -> torch or DeepSpeed ZeRO optimizer
    if hasattr(opt, "bit16_groups"):  # ZeRO-1/2: one list of model params per group
        torch_groups, members = opt.optimizer.param_groups, opt.bit16_groups
    elif hasattr(opt, "fp16_groups") and hasattr(opt, "sub_group_to_group_id"):  # ZeRO-3: sub-groups
        torch_groups = opt.optimizer.param_groups
        members = [[] for _ in torch_groups]
        for sub, gid in opt.sub_group_to_group_id.items():
            members[gid].extend(opt.fp16_groups[sub])
    else:
        torch_groups, members = opt.param_groups, [g["params"] for g in opt.param_groups]
    return [
        {"weight_decay": g["weight_decay"], "names": sorted(name_of[id(p)] for p in ps)}
        for g, ps in zip(torch_groups, members)
    ]


def main() -> int:
    """Train, write result.pt on rank 0; returns the world size."""
    a = parse()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.zero:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # docs/architecture.md, trap 10: before TrainingArguments
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from llmreg import RegTrainer
    from llmreg.data import build_char_tokenizer, make_builtin_dataset, tiny_llama

    tok = build_char_tokenizer()
    ds = make_builtin_dataset(num_examples=64, seed=1)
    # fixed length so every rank and the single process see identical token counts
    ds = ds.map(
        lambda b: tok(b["text"], padding="max_length", max_length=32, truncation=True),
        batched=True,
        remove_columns=["text"],
    )
    per_device = a.global_batch // world // a.grad_accum
    args = TrainingArguments(
        output_dir=os.path.join(a.out, "trainer"),
        max_steps=a.steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=a.grad_accum,
        learning_rate=a.lr,
        weight_decay=a.weight_decay,
        max_grad_norm=a.max_grad_norm,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        train_sampling_strategy="sequential",
        deepspeed=os.path.join(REPO, "ds_configs", f"zero{a.zero}.json") if a.zero else None,
        disable_tqdm=True,
    )
    model = tiny_llama(vocab_size=len(tok), seed=0)  # under ZeRO-3 this runs inside zero.Init
    if a.peft:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(
            model,
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"),
        )
    trainer = RegTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        regularizers=json.loads(a.regularizers),
    )
    trainer.train()
    if a.save_final:
        trainer.save_model(a.save_final)  # every rank: gathers ZeRO-3 partitions, rank 0 writes
    if a.importance_out:
        from llmreg.regularizers import SIImportance
        from llmreg.regularizers.forgetting.record import write_si_artifact

        recorder = next(r for r in trainer.reg_stack if isinstance(r, SIImportance))
        write_si_artifact(trainer, recorder, a.importance_out, model="tiny_llama seed 0")

    rank = args.process_index
    stored = {}
    for label, reg in zip(trainer.reg_stack.labels, trainer.reg_stack):
        for attr, value in vars(reg).items():
            if isinstance(value, dict) and value and all(torch.is_tensor(v) for v in value.values()):
                stored[f"{label}.{attr}"] = sum(v.numel() for v in value.values())
    groups = optimizer_groups_by_name(trainer)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wrapper
    inner = getattr(inner, "optimizer", inner)  # DeepSpeed ZeRO optimizer -> the torch optimizer it steps
    adam_numel = sum(st["exp_avg"].numel() for st in inner.state.values() if "exp_avg" in st)
    engine = trainer.model_wrapped if a.zero else None
    mine = {
        "stored": stored,
        "groups": groups,
        "adam_exp_avg_numel": adam_numel,
        "ds_gradient_clipping": engine.gradient_clipping() if engine is not None else None,
    }
    gathered = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(gathered, mine)
    else:
        gathered = [mine]

    weights = gathered_weights(trainer.model, a.zero)
    names = getattr(trainer, "reg_param_group_names", None)
    if rank == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        metrics = [
            {k: v for k, v in h.items() if k.startswith("reg/")} for h in trainer.state.log_history if "loss" in h
        ]
        torch.save(
            {
                "losses": losses,
                "metrics": metrics,
                "weights": weights,
                "per_rank": gathered,
                "group_names": names,
                "world": world,
            },
            os.path.join(a.out, "result.pt"),
        )
    return world


if __name__ == "__main__":
    leave(main())
