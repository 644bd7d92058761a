"""Everything that knows the host libraries: the trainer mixin (`hf`), TRL's version-sensitive internals and
the GRPO hook protocol (`trl`), and the DeepSpeed backward/step shim (`deepspeed`).

`llmreg.core` stays torch-only; regularizers and the public trainers import from here. Nothing here imports a
regularizer.
"""
