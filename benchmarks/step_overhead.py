"""Per-step time and memory overhead of each registered regularizer.

    python benchmarks/step_overhead.py [--only NAME ...] [--steps N] [--size tiny|default] [--json PATH]
    python benchmarks/step_overhead.py --trainer grpo [--only lp_reg] ...     # GRPO-only regularizers
    python benchmarks/step_overhead.py --only half_ft l2_sp --steps 5 --warmup 2 \
        --model ../shared/data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf   # a real checkpoint

`--model PATH` (a model folder, or DIR/NAME.gguf, de-quantised once into the GGUF cache, llmreg.recipe.gguf):
every variant starts from that checkpoint's weights (fp32) instead of a seeded `tiny_llama`, with random tokens
of its vocabulary, sequence length 128 (issue 18: SmolLM2-135M at 4 x 128). All variants are held in memory at
once (each a model + gradients + Adam state, ~2.2 GB for 135M parameters in fp32, plus activations): bound the
number with --only on a small machine.

What is compared. "vanilla" is `RegTrainer(regularizers=[])`, which delegates
every override straight to `transformers.Trainer`. Every other variant is
`RegTrainer(regularizers=[name])` with the regularizer's default options. Each
variant gets its own model, rebuilt from the same seed (identical initial
weights), its own `default_data_collator`, and the same random-token data
(sequence length 256 for `--size default`, 64 for `tiny`; batch size 4; no
gradient accumulation). On CPU everything is fp32; on CUDA the Trainer runs
with `bf16=True` (autocast, fp32 master weights).

How a step is timed. Each variant runs one real `trainer.train()` for
`warmup + steps` optimizer steps, so every hook point of the mixin is
exercised exactly as in a user's run: `create_optimizer` -> `param_groups`,
`_prepare_for_training` -> `on_prepared`, `compute_loss` -> `loss_terms`,
`training_step` -> `pre_step`, the `on_optimizer_step` callback ->
`post_step`. To interleave the variants step by step (so CPU frequency
changes, thermal drift and background noise hit all variants alike) each
`train()` runs in its own thread, and a timing callback passes a baton:

- `on_train_begin` (after the optimizer exists and accelerate prepared the
  model) parks the thread until the driver hands it the baton, so setup is
  serial and untimed;
- `on_step_begin` records `time.perf_counter()`;
- `on_step_end` records the end time, hands the baton back to the driver and
  parks the thread again.

Exactly one thread runs at any moment, so there is no contention between
variants; the driver runs round r = 0 .. warmup+steps-1 and, in each round,
lets every variant do one optimizer step, in a rotated order (round r starts
with variant r mod V). A step's time therefore covers forward, `loss_terms`,
backward, `pre_step`, gradient clipping, the optimizer step, `post_step`, the
scheduler step and `zero_grad`; batch fetching and logging fall outside the
window. The reported time is the median over the steps after the first
`--warmup` (default 3) of each variant; `step_time_ratio` is that median over
vanilla's median. Also reported: `paired_step_time_ratio`, the median over
rounds of (this variant's step / vanilla's step in the same round), which
cancels slow drifts and is the steadier number when other processes load the
machine; the 1-minute load average is printed and saved to judge that.

Memory. With CUDA, a second, sequential pass builds each variant alone
(after freeing every other model), resets the peak statistics and runs a few
steps; the measure is `torch.cuda.max_memory_allocated()` above what was
allocated before the model was built ("CUDA peak allocated"). On CPU, where
no allocator keeps a trustworthy per-variant peak inside one process, the
measure is "tensor state": the bytes of parameters + gradients + optimizer
state + every tensor the regularizers hold (attributes, and dicts / lists /
tuples of tensors, one level of objects deep), counted once per storage, read
in `on_optimizer_step` of the last step (gradients and optimizer state both
exist then). Activations are not part of it.

`--trainer grpo` compares `RegGRPOTrainer(regularizers=[])` with each regularizer that supports GRPO
(e.g. lp_reg), all with the same generation settings: the same prompts, 4 completions per prompt of exactly
`max_completion_length` tokens (EOS suppressed with `min_new_tokens`, so every step generates the same number
of tokens), T = 1, a dense deterministic reward of the completion ids, beta = 0, ratio clip [0, 10], dapo loss,
on-policy. A GRPO step's time includes generation, the reward and (lp_reg) the proxy pass.

`--json PATH` writes a list of {"name", "trainer", "step_time_ratio",
"peak_mem_ratio", "optimizer_state_ratio" (optimizer state bytes over vanilla's), plus "step_time_ms",
"step_time_ms_min/max",
"paired_step_time_ratio", "peak_mem_mb", "mem_measure", "state_mb", "steps",
"warmup", "size", "device", "loadavg_1min"}, vanilla first with ratios 1.0. Regularizers that
cannot run here with default options (another trainer kind only, or their
construction fails) are listed as skipped, with the reason, and left out of
the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

VANILLA = "vanilla"
TRAINER_KIND = "hf"
SEQ_LEN = {"tiny": 64, "default": 256, "model": 128}  # "model": --model PATH
MODEL_PATH: str | None = None  # --model: a checkpoint instead of tiny_llama
BATCH_SIZE = 4
SEED = 0
BATON_TIMEOUT_S = 1800.0
# benchmark variants beyond the registered names: name -> regularizer spec (non-default options)
VARIANTS: dict[str, dict[str, Any]] = {
    "lfu_lora": {"name": "lfu", "aux": "lora"},  # LfU with the auxiliary LoRA perturbation instead of RepS
    # the spec's activation-scaling form of the multiplied linear layers, against the default fused weight form
    "multipliers_explicit": {"name": "multipliers", "impl": "explicit"},
}


# ---------------------------------------------------------------------------------------------
# data and trainers
# ---------------------------------------------------------------------------------------------
def random_token_rows(num_rows: int, seq_len: int, vocab_size: int, seed: int = SEED) -> list[dict[str, list[int]]]:
    """The same random token sequences for every variant (token 0 is padding and is avoided)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (num_rows, seq_len), generator=gen)
    return [{"input_ids": row, "attention_mask": [1] * seq_len, "labels": row} for row in ids.tolist()]


GRPO_PROMPTS_PER_STEP = 2
GRPO_GENERATIONS = 4


def completion_id_reward(completion_ids, **_):
    """Dense and deterministic: a hash of the token ids in [0, 1), so every group has non-zero advantages."""
    return [((sum((i + 1) * t for i, t in enumerate(ids)) * 2654435761) % 1000) / 1000.0 for ids in completion_ids]


def build_grpo_trainer(name: str, size: str, max_steps: int, output_dir: str, callbacks: list) -> Any:
    """A RegGRPOTrainer for variant `name` (VANILLA: no regularizer) on a freshly seeded model."""
    import trl
    from transformers import PrinterCallback

    from llmreg import RegGRPOTrainer
    from llmreg.data import build_char_tokenizer, make_builtin_dataset

    cuda = torch.cuda.is_available()
    tok = build_char_tokenizer()
    model = make_model(size)  # its vocabulary (8000 for default) is what the proxy pays for
    length = SEQ_LEN[size] // 4
    args = trl.GRPOConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=GRPO_PROMPTS_PER_STEP * GRPO_GENERATIONS,
        num_generations=GRPO_GENERATIONS,
        max_completion_length=length,
        generation_kwargs={"min_new_tokens": length},
        temperature=1.0,
        beta=0.0,
        epsilon=1.0,
        epsilon_high=9.0,
        loss_type="dapo",
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        use_cpu=not cuda,
        bf16=cuda,
        report_to=[],
        save_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        seed=SEED,
        data_seed=SEED,
    )
    dataset = make_builtin_dataset(format="prompt_only", num_examples=GRPO_PROMPTS_PER_STEP * (max_steps + 1))
    regularizers = [] if name == VANILLA else [name]
    trainer = RegGRPOTrainer(
        model=model,
        args=args,
        processing_class=tok,
        reward_funcs=completion_id_reward,
        train_dataset=dataset,
        callbacks=callbacks,
        regularizers=regularizers,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def build_trainer(name: str, size: str, max_steps: int, rows: list[dict], output_dir: str, callbacks: list) -> Any:
    """A RegTrainer for variant `name` (VANILLA: no regularizer) on a freshly seeded model."""
    from transformers import PrinterCallback, TrainingArguments, default_data_collator

    if TRAINER_KIND == "grpo":
        return build_grpo_trainer(name, size, max_steps, output_dir, callbacks)

    from llmreg import RegTrainer

    cuda = torch.cuda.is_available()
    model = make_model(size)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        use_cpu=not cuda,
        bf16=cuda,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=10**9,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=SEED,
        data_seed=SEED,
    )
    regularizers = [] if name == VANILLA else [regularizer_spec(name, model, output_dir)]
    trainer = RegTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=default_data_collator,
        callbacks=callbacks,
        regularizers=regularizers,
    )
    trainer.remove_callback(PrinterCallback)  # the end-of-train metrics would clutter the table
    return trainer


def regularizer_spec(name: str, model: Any, output_dir: str) -> Any:
    """Default options, plus what a regularizer cannot run without: `forgetting_penalty` gets an importance
    artifact for the benchmark model (random Omega; the values do not change the cost of a step); `noisefit` gets
    k = 2 on the 2-layer tiny model."""
    if name == "forgetting_penalty":
        from llmreg.regularizers.forgetting.artifact import random_artifact

        return {"name": name, "artifact": random_artifact(os.path.join(output_dir, "importance"), model)}
    if name in VARIANTS:
        return dict(VARIANTS[name])
    if name == "noisefit" and model.config.num_hidden_layers < 3:
        # its default k = 3 noisy layers needs 3 decoder layers; the 2-layer `--size tiny` smoke model gets k = 2
        return {"name": name, "num_layers": model.config.num_hidden_layers}
    return name


# ---------------------------------------------------------------------------------------------
# memory measures
# ---------------------------------------------------------------------------------------------
def _tensors_in(obj: Any, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 3:
        return
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from _tensors_in(value, depth + 1)


def _regularizer_tensors(reg: Any):
    for key, value in vars(reg).items():
        if key == "options" or key.startswith("_hook"):
            continue
        yield from _tensors_in(value)
        if isinstance(value, torch.nn.Module):
            # e.g. a frozen reference copy; the trained model itself is deduplicated by storage
            yield from value.parameters()
            yield from value.buffers()
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, type)):
            # one level into plain helper objects (not into a trainer's model: that is a Module attribute)
            for inner in vars(value).values():
                yield from _tensors_in(inner)


def tensor_state_bytes(trainer: Any) -> dict[str, int]:
    """Bytes of params, grads, optimizer state and regularizer tensors, each storage counted once."""
    seen: set[tuple[int, int]] = set()

    def count(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key in seen or storage.nbytes() == 0:
                continue
            seen.add(key)
            total += storage.nbytes()
        return total

    model = trainer.model
    params = list(model.parameters())
    out = {"params": count(params) + count(model.buffers())}
    out["grads"] = count(p.grad for p in params)
    optimizer = trainer.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    out["optimizer"] = count(t for state in inner.state.values() for t in _tensors_in(state))
    out["regularizers"] = count(t for reg in trainer.reg_stack for t in _regularizer_tensors(reg))
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------------------------
# the interleaving driver
# ---------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    trainer: Any = None
    thread: threading.Thread | None = None
    go: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    done: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    step_times: list[float] = field(default_factory=list)
    state_bytes: dict[str, int] = field(default_factory=dict)
    error: BaseException | None = None
    finished: bool = False
    skipped: str | None = None
    cuda_peak: int | None = None


def _make_timing_callback(variant: Variant):
    from transformers import TrainerCallback

    class BatonTiming(TrainerCallback):
        """Parks the training thread between optimizer steps; times each step."""

        def __init__(self) -> None:
            self._t0 = 0.0

        def _park(self) -> None:
            variant.done.release()
            if not variant.go.acquire(timeout=BATON_TIMEOUT_S):
                raise RuntimeError(f"{variant.name}: the benchmark driver never handed the baton back")

        def on_train_begin(self, args, state, control, **kwargs):
            self._park()

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step + 1 == state.max_steps:  # last step: grads and optimizer state both exist
                variant.state_bytes = tensor_state_bytes(variant.trainer)

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            variant.step_times.append(time.perf_counter() - self._t0)
            self._park()

    return BatonTiming()


def _train_in_thread(variant: Variant) -> None:
    try:
        variant.trainer.train()
    except BaseException as exc:  # noqa: BLE001 - reported by the driver
        variant.error = exc
    finally:
        variant.finished = True
        variant.done.release()


def _wait(variant: Variant) -> None:
    if not variant.done.acquire(timeout=BATON_TIMEOUT_S):
        raise RuntimeError(f"{variant.name}: no step finished within {BATON_TIMEOUT_S:.0f} s")
    if variant.error is not None:
        raise RuntimeError(f"variant '{variant.name}' failed during training") from variant.error


def skip_reason(name: str) -> str | None:
    from llmreg import get_regularizer_class

    cls = get_regularizer_class(VARIANTS[name]["name"] if name in VARIANTS else name)
    if TRAINER_KIND not in cls.requires.trainers:
        return f"needs trainer kind {'/'.join(cls.requires.trainers)}"
    return None


def run_timing(names: list[str], size: str, steps: int, warmup: int, workdir: str, log=print) -> list[Variant]:
    total_steps = warmup + steps
    vocab = tiny_llama_vocab(size)
    rows = random_token_rows(BATCH_SIZE * (total_steps + 1), SEQ_LEN[size], vocab)
    variants = [Variant(VANILLA)] + [Variant(n) for n in names]
    active: list[Variant] = []
    for variant in variants:
        if variant.name != VANILLA:
            variant.skipped = skip_reason(variant.name)
            if variant.skipped:
                log(f"  skip {variant.name}: {variant.skipped}")
                continue
        try:
            variant.trainer = build_trainer(
                variant.name,
                size,
                total_steps,
                rows,
                os.path.join(workdir, variant.name),
                [_make_timing_callback(variant)],
            )
        except Exception as exc:  # noqa: BLE001
            if variant.name == VANILLA:
                raise
            variant.skipped = f"cannot build with default options: {type(exc).__name__}: {exc}"
            log(f"  skip {variant.name}: {variant.skipped}")
            continue
        variant.thread = threading.Thread(
            target=_train_in_thread, args=(variant,), name=f"train-{variant.name}", daemon=True
        )
        variant.thread.start()
        try:
            _wait(variant)  # parked in on_train_begin: setup done, nothing timed yet
        except RuntimeError as exc:
            if variant.name == VANILLA:
                raise
            variant.skipped = f"setup failed: {exc.__cause__!r}"
            log(f"  skip {variant.name}: {variant.skipped}")
            variant.thread.join()
            variant.trainer = None
            continue
        active.append(variant)

    started = time.perf_counter()
    for r in range(total_steps):
        k = r % len(active)
        for variant in active[k:] + active[:k]:
            variant.go.release()
            try:
                _wait(variant)
            except RuntimeError:
                if variant.name == VANILLA or variant.error is None:
                    raise
                # a regularizer that crashes mid-run is reported, the others still get measured
                variant.skipped = f"failed at step {len(variant.step_times) + 1}: {variant.error!r}"
                log(f"  drop {variant.name}: {variant.skipped}")
                variant.thread.join()
                variant.trainer = None
                active.remove(variant)
        if r == 0 or (r + 1) % 5 == 0 or r + 1 == total_steps:
            log(f"  round {r + 1}/{total_steps} done ({time.perf_counter() - started:.1f} s)")
    for variant in active:  # let each train() finish, one at a time
        variant.go.release()
        variant.thread.join(timeout=BATON_TIMEOUT_S)
        if variant.error is not None:
            raise RuntimeError(f"variant '{variant.name}' failed at the end of training") from variant.error
    return variants


def make_model(size: str) -> Any:
    """A fresh model of the benchmark: the --model checkpoint (fp32), else tiny_llama of `size` (seeded)."""
    if MODEL_PATH is not None:
        from transformers import AutoModelForCausalLM

        from llmreg.recipe.gguf import gguf_model_folder

        return AutoModelForCausalLM.from_pretrained(gguf_model_folder(MODEL_PATH), dtype=torch.float32)
    from llmreg.data import tiny_llama

    return tiny_llama(size=size, seed=SEED)


def tiny_llama_vocab(size: str) -> int:
    if MODEL_PATH is not None:
        from transformers import AutoConfig

        from llmreg.recipe.gguf import gguf_model_folder

        return AutoConfig.from_pretrained(gguf_model_folder(MODEL_PATH)).vocab_size
    from llmreg.data import tiny_llama_config

    return tiny_llama_config(size).vocab_size


def run_cuda_memory(variants: list[Variant], size: str, workdir: str, mem_steps: int = 3) -> None:
    """Sequential pass: one variant on the GPU at a time; peak allocated above the pre-build baseline."""
    rows = random_token_rows(BATCH_SIZE * (mem_steps + 1), SEQ_LEN[size], tiny_llama_vocab(size), seed=SEED + 1)
    for variant in variants:
        variant.trainer = None
    gc.collect()
    torch.cuda.empty_cache()
    for variant in variants:
        if variant.skipped:
            continue
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        trainer = build_trainer(variant.name, size, mem_steps, rows, os.path.join(workdir, "mem-" + variant.name), [])
        trainer.train()
        torch.cuda.synchronize()
        variant.cuda_peak = torch.cuda.max_memory_allocated() - base
        del trainer
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def device_description() -> str:
    if torch.cuda.is_available():
        return f"CUDA {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads"


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def summarise(variants: list[Variant], warmup: int, steps: int, size: str) -> tuple[list[dict], str]:
    cuda = torch.cuda.is_available()
    mem_measure = "cuda_peak_allocated" if cuda else "tensor_state"
    ran = [v for v in variants if not v.skipped]
    base = ran[0]
    assert base.name == VANILLA

    def median_ms(v: Variant) -> float:
        return 1000.0 * statistics.median(v.step_times[warmup:])

    def mem_bytes(v: Variant) -> int:
        return v.cuda_peak if cuda else v.state_bytes.get("total", 0)

    base_ms, base_mem = median_ms(base), mem_bytes(base)
    records = []
    for v in ran:
        ms, mem = median_ms(v), mem_bytes(v)
        times = [1000.0 * t for t in v.step_times[warmup:]]
        # same-round pairs ran back to back, so their ratio cancels slow drifts and background load
        paired = statistics.median(t / b for t, b in zip(v.step_times[warmup:], base.step_times[warmup:]))
        records.append(
            {
                "name": v.name,
                "trainer": TRAINER_KIND,
                "step_time_ratio": ms / base_ms,
                "peak_mem_ratio": mem / base_mem if base_mem else float("nan"),
                # optimizer state alone (what freezing saves): this variant's over vanilla's
                "optimizer_state_ratio": (
                    v.state_bytes.get("optimizer", 0) / base.state_bytes["optimizer"]
                    if base.state_bytes.get("optimizer")
                    else float("nan")
                ),
                "step_time_ms": ms,
                "step_time_ms_min": min(times),
                "step_time_ms_max": max(times),
                "paired_step_time_ratio": paired,
                "peak_mem_mb": mem / 2**20,
                "mem_measure": mem_measure,
                "state_mb": {k: round(b / 2**20, 2) for k, b in v.state_bytes.items()},
                "steps": len(times),
                "warmup": warmup,
                "size": size,
                "model": MODEL_PATH,
                "device": device_description(),
                "loadavg_1min": _loadavg(),
            }
        )
    mem_title = "CUDA peak allocated (MiB)" if cuda else "tensor state (MiB)"
    header = (
        f"| name | trainer | median step (ms) | min-max (ms) | step_time_ratio | paired ratio | {mem_title} "
        "| peak_mem_ratio | optimizer_state_ratio |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(
            f"| {r['name']} | {r['trainer']} | {r['step_time_ms']:.1f} | "
            f"{r['step_time_ms_min']:.0f}-{r['step_time_ms_max']:.0f} | {r['step_time_ratio']:.3f} | "
            f"{r['paired_step_time_ratio']:.3f} | "
            f"{r['peak_mem_mb']:.1f} | {r['peak_mem_ratio']:.3f} | {r['optimizer_state_ratio']:.3f} |"
        )
    for v in variants:
        if v.skipped:
            lines.append(f"| {v.name} | {TRAINER_KIND} | skipped: {v.skipped} | | | | | | |")
    return records, "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--only",
        nargs="+",
        action="extend",
        metavar="NAME",
        default=None,
        help="time only these registered regularizers (vanilla is always included)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default 3)")
    parser.add_argument(
        "--size",
        choices=("tiny", "default"),
        default="default",
        help="tiny: 2-layer toy, seq 64; default: ~20M-parameter Llama, seq 256",
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="a model folder or DIR/NAME.gguf to time instead of tiny_llama (sequence length 128; overrides --size)",
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="write the per-variant ratios here")
    parser.add_argument(
        "--trainer",
        choices=("hf", "grpo"),
        default="hf",
        help="hf: RegTrainer on random tokens; grpo: RegGRPOTrainer (generation included)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.model is not None:
        path = os.path.expanduser(args.model)
        if not (os.path.isdir(path) or (os.path.isfile(path) and path.lower().endswith(".gguf"))):
            parser.error(f"--model: not a model folder or a .gguf file: {args.model}")
        args.size = "model"
    return args


def main(argv: list[str] | None = None) -> int:
    global TRAINER_KIND, MODEL_PATH
    args = parse_args(argv)
    TRAINER_KIND = args.trainer
    MODEL_PATH = args.model
    import llmreg
    from llmreg.core.options import ConfigError

    registered = list(llmreg.available())
    if args.only:
        names = []
        for name in args.only:
            if name == VANILLA:
                continue
            try:
                llmreg.get_regularizer_class(VARIANTS[name]["name"] if name in VARIANTS else name)
            except ConfigError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if name not in names:
                names.append(name)
    else:
        names = registered + list(VARIANTS)

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    print(
        f"step overhead: trainer={TRAINER_KIND} size={args.size} seq={SEQ_LEN[args.size]} batch={BATCH_SIZE} "
        f"steps={args.steps} "
        f"warmup={args.warmup} device={device_description()} load average (1 min) at start: {_loadavg()}"
    )
    print(f"variants: {', '.join([VANILLA] + names)}")
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmreg-bench-") as workdir:
        variants = run_timing(names, args.size, args.steps, args.warmup, workdir)
        if torch.cuda.is_available():
            print("  CUDA memory pass (sequential)")
            run_cuda_memory(variants, args.size, workdir)
    records, table = summarise(variants, args.warmup, args.steps, args.size)
    print()
    print(table)
    measure = (
        "CUDA peak allocated"
        if torch.cuda.is_available()
        else ("tensor state = params + grads + optimizer state + regularizer tensors (activations excluded)")
    )
    print(f"\nmemory measure: {measure}")
    print(f"wall time: {time.perf_counter() - wall:.1f} s; load average (1 min) at end: {_loadavg()}")
    if args.json:
        for r in records:
            for key in ("step_time_ratio", "peak_mem_ratio", "optimizer_state_ratio"):
                if not math.isfinite(r[key]):
                    r[key] = None
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
