"""Command line for the testbed: `llmreg testbed ...` or `python -m llmreg.testbed ...`

    python -m llmreg.testbed build [--steps N] [--size small] [--seed 0] [--cache-dir DIR]
    python -m llmreg.testbed forget PATH [--skill sub] [--steps 800] [--lr 1e-4] [--eval-every 50]

`forget` fine-tunes the built model on the new skill with no regularizer and prints, as
JSON lines, the scores along the way and the summary: old-skill scores before/after,
the average drop in points, the new-skill score.
"""

from __future__ import annotations

import argparse
import json
import time

from llmreg.testbed import skills as S


def summarize(before: dict[str, float], after: dict[str, float], new_skill: str = S.NEW_SKILL) -> dict:
    old = [s for s in before if s != new_skill]
    drops = {s: round(100 * (before[s] - after[s]), 1) for s in old}
    return dict(
        before=before,
        after=after,
        drop_points=drops,
        avg_old_drop_points=round(sum(drops.values()) / len(drops), 1),
        new_skill=after[new_skill],
    )


def _parser() -> argparse.ArgumentParser:
    from llmreg.testbed.build import DEFAULTS, SIZES, default_cache_root

    p = argparse.ArgumentParser(
        prog="llmreg testbed",
        description="The CPU forgetting testbed: `build` pre-trains (or loads from the cache) a small model on "
        f"the old skills {', '.join(S.OLD_SKILLS)}; `forget` fine-tunes it on the new skill {S.NEW_SKILL} with no "
        "regularizer and prints the scores as JSON lines. Recipes: recipes/testbed/README.md.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{build,forget}")
    b = sub.add_parser("build", help="pre-train the testbed model (cached by its build options)")
    b.add_argument("--steps", type=int, help=f"pre-training steps (default {DEFAULTS['steps']})")
    b.add_argument("--size", choices=list(SIZES), help=f"model size (default {DEFAULTS['size']})")
    b.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default 0)")
    b.add_argument("--cache-dir", metavar="DIR", help=f"build cache (default {default_cache_root()})")
    f = sub.add_parser("forget", help="fine-tune a built model on one skill, print scores before and after")
    f.add_argument("path", help="the built model's folder (printed by `build`)")
    f.add_argument(
        "--skill", default=S.NEW_SKILL, choices=list(S.SKILLS), help="skill to fine-tune on (default %(default)s)"
    )
    f.add_argument("--steps", type=int, default=800, help="fine-tuning steps (default %(default)s)")
    f.add_argument("--lr", type=float, default=1e-4, help="learning rate (default %(default)s)")
    f.add_argument("--batch-size", type=int, default=32, help="examples per step (default %(default)s)")
    f.add_argument("--seed", type=int, default=0, help="seed of the data order (default %(default)s)")
    f.add_argument("--eval-every", type=int, default=0, metavar="N", help="score every N steps too (default 0: never)")
    f.add_argument(
        "--eval-n", type=int, default=200, metavar="N", help="held-out examples per skill (default %(default)s)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)

    from llmreg.testbed.build import build, evaluate_all, load

    if a.cmd == "build":
        kw = {k: v for k, v in dict(steps=a.steps, size=a.size).items() if v is not None}
        t0 = time.time()
        path = build(cache_dir=a.cache_dir, seed=a.seed, log=lambda s: print(s, flush=True), **kw)
        print(
            json.dumps(
                dict(
                    path=str(path),
                    seconds=round(time.time() - t0, 1),
                    scores=json.loads((path / "scores.json").read_text()),
                )
            )
        )
        return 0

    import transformers

    from llmreg.testbed.finetune import finetune

    base, tok, _ = load(a.path)
    before = evaluate_all(base, tok, eval_n=a.eval_n)
    print(json.dumps(dict(step=0, scores=before)), flush=True)
    callbacks = []
    if a.eval_every:

        class Probe(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step % a.eval_every == 0 and state.global_step < a.steps:
                    print(
                        json.dumps(dict(step=state.global_step, scores=evaluate_all(model, tok, eval_n=a.eval_n))),
                        flush=True,
                    )
                    model.train()

        callbacks.append(Probe())
    t0 = time.time()
    model = finetune(a.path, a.skill, steps=a.steps, lr=a.lr, seed=a.seed, batch_size=a.batch_size, callbacks=callbacks)
    after = evaluate_all(model, tok, eval_n=a.eval_n)
    print(json.dumps(dict(step=a.steps, scores=after)), flush=True)
    print(
        json.dumps(dict(summarize(before, after, a.skill), steps=a.steps, lr=a.lr, seconds=round(time.time() - t0, 1))),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
