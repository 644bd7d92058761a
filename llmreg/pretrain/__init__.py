"""Pre-training under infinite compute (arXiv 2509.14786): data-constrained pre-training recipes.

- `data`: the `data.pretrain` recipe mode: raw text -> documents -> token stream -> fixed-length blocks,
  a fixed token budget (repeated by `trainer.num_train_epochs`, in a per-seed order) and a held-out split.
- `sweep`: `llmreg sweep RECIPE --grid key=v1,v2 ...`: runs a grid one run after another (resumable),
  tabulates final validation loss and checks the best point's grid neighbours (the paper's certificate).
- `fit`: L(x) = A / x^alpha + E by least squares with A, alpha, E >= 0 (model size N, ensemble size K).
- `ensemble`: an ensemble of K checkpoints as one causal LM (logit or probability averaging), for
  validation loss and lm-eval tasks.
- `distill`: synthetic documents sampled from a teacher or an ensemble, mixed with the real blocks.
"""

from llmreg.pretrain import recipe_mode  # noqa: F401  (registers data.pretrain with llmreg.recipe.data_modes)
