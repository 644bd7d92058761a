"""The typed form of a recipe: one dataclass per section.

These are the *validated* values (see `validate.py`): paths are absolute,
defaults are filled in, trainer fields are coerced to their config class's
types. `Recipe.to_dict()` is what a run writes to `<output_dir>/recipe.yaml`,
and loading that file again gives the same recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

TRAINER_KINDS = ("hf", "sft", "dpo", "grpo")

# the row format `builtin:<task>` data takes for each trainer kind (see llmreg.data.builtin)
BUILTIN_FORMATS = {"hf": "text", "sft": "prompt_completion", "dpo": "preference", "grpo": "prompt_only"}

DTYPES = ("auto", "float32", "bfloat16", "float16")
BUILTIN_TOKENIZERS = ("char",)

BUILTIN_PREFIX = "builtin:"
HUB_PREFIX = "hub:"


def trainer_config_class(kind: str) -> type:
    """The config dataclass whose fields the `trainer:` section may set."""
    import transformers
    import trl

    return {"hf": transformers.TrainingArguments, "sft": trl.SFTConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig}[
        kind
    ]


@dataclass
class ModelSpec:
    """`model:`: a pretrained model (`name_or_path`), one built from scratch (`config`) or the testbed's (`testbed`)."""

    name_or_path: str | None = None
    # LlamaConfig-style fields, or {size: tiny|default, ...overrides}; {model_type: ...} picks another architecture
    config: dict | None = None
    dtype: str = "auto"  # one of DTYPES
    seed: int | None = None  # initialisation seed of a from-config model; defaults to the recipe's seed
    # the forgetting testbed's pre-trained model: a preset ("default") or build options (llmreg.testbed.build)
    testbed: str | dict | None = None
    gguf_file: str | None = None  # a GGUF file in the folder name_or_path (llmreg.recipe.gguf)

    def describe(self) -> str:
        """One line for logs and artifact metadata: the path or hub name, the testbed, or the config."""
        if self.name_or_path:
            return f"{self.name_or_path}/{self.gguf_file}" if self.gguf_file else self.name_or_path
        return f"testbed {self.testbed}" if self.testbed is not None else f"new from config {self.config}"


@dataclass
class TokenizerSpec:
    """`tokenizer:`: a pretrained tokenizer or the built-in character tokenizer."""

    name_or_path: str | None = None
    builtin: str | None = None  # one of BUILTIN_TOKENIZERS
    model_max_length: int | None = None
    gguf_file: str | None = None  # the tokenizer of a GGUF file in the folder name_or_path


@dataclass
class SourceSpec:
    """One data source: a local file or `save_to_disk` directory, `hub:<name>` or `builtin:<task>`."""

    path: str
    split: str | None = None  # for hub datasets and DatasetDict directories
    subset: str | None = None  # hub dataset configuration name
    max_examples: int | None = field(default=None, metadata={"ge": 1})  # keep the first N rows
    text_field: str | None = None  # column renamed to "text" (kinds hf and sft)
    # columns renamed to "prompt" / "completion" (SFT on prompt-completion pairs, e.g. GSM8K question -> answer)
    prompt_field: str | None = None
    completion_field: str | None = None
    # with prompt_field/completion_field: the prompt as one user turn and the completion as one assistant turn,
    # TRL's conversational prompt-completion format (the tokenizer's chat template; loss on the assistant turn)
    chat: bool = False
    num_examples: int | None = field(default=None, metadata={"ge": 1})  # builtin only (validation fills in 1000)
    seed: int | None = None  # builtin only (validation fills in 0 for train, 1 for eval)
    # rows dropped before max_examples is applied (replay rows disjoint from documents evaluated later)
    skip: int | None = field(default=None, metadata={"ge": 0})
    weight: float | None = field(default=None, metadata={"gt": 0})  # a source of a mixture (llmreg.recipe.mixture)
    separator: str | None = None  # a text file (.txt): what splits it into rows (default: a blank line)

    @property
    def kind(self) -> str:
        """builtin, hub or local."""
        if self.path.startswith(BUILTIN_PREFIX):
            return "builtin"
        if self.path.startswith(HUB_PREFIX):
            return "hub"
        return "local"

    @property
    def name(self) -> str:
        """The task of a builtin source, the dataset of a hub source, else the path."""
        return self.path.split(":", 1)[1] if self.kind != "local" else self.path


def as_chat_turns(row: dict) -> dict:
    """`data.<role>.chat`: prompt -> one user message, completion -> one assistant message (TRL's conversational
    prompt-completion rows; TRL applies the tokenizer's chat template and masks the prompt). GRPO's `answer`
    column is the reward's reference, left as it is."""
    out = {"prompt": [{"role": "user", "content": row["prompt"]}]}
    if "completion" in row:
        out["completion"] = [{"role": "assistant", "content": row["completion"]}]
    return out


MIX_STRATEGIES = ("interleave", "concat")
MIX_STOPPING = ("first_exhausted", "all_exhausted")


@dataclass
class MixSpec:
    """`data.mix:` how a list of training sources becomes one dataset (llmreg.recipe.mixture)."""

    strategy: str = "interleave"  # one of MIX_STRATEGIES
    stopping: str = "first_exhausted"  # one of MIX_STOPPING (interleave only)
    seed: int | None = None  # draws the source of each row; validation fills in the recipe's seed


@dataclass
class DataSpec:
    train: SourceSpec | list[SourceSpec]  # a list is a mixture, built as `mix` says
    eval: SourceSpec | None = None
    pretrain: Any = None  # llmreg.pretrain.data.PretrainSpec: packed fixed-budget pre-training blocks
    mix: MixSpec | None = None  # set exactly when train is a list

    @property
    def train_sources(self) -> list[SourceSpec]:
        """The training sources: the one source, or each source of a mixture."""
        return list(self.train) if isinstance(self.train, list) else [self.train]


@dataclass
class TrainerSpec:
    """`trainer:`: `kind` plus fields of that kind's config class (`args`, validated and coerced)."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    reward: str | None = None  # grpo only: a name in REWARDS or "module:function"


@dataclass
class EvalDuringTrainingSpec:
    """`eval_during_training:`: a suite run on the in-memory model every `every_steps` optimizer steps,
    logged as eval/<task> (llmreg.eval.callback.EvalSuiteCallback)."""

    suite: str  # suite YAML (eval/suites/*.yaml); absolute after validation
    every_steps: int = 100
    limit: int | None = None  # documents per task; keep it small, it runs inside training
    batch_size: int = 4


@dataclass
class Recipe:
    model: ModelSpec
    tokenizer: TokenizerSpec
    data: DataSpec
    trainer: TrainerSpec
    peft: dict | None = None  # peft.LoraConfig fields
    regularizers: list[dict] = field(default_factory=list)  # {name: ..., **options}, options coerced
    output_dir: str = "runs/recipe"
    resume: bool = False
    seed: int = 42
    eval_during_training: EvalDuringTrainingSpec | None = None
    importance: Any = None  # llmreg.recipe.importance_spec.ImportanceSpec: phase 1 of the forgetting penalty
    path: str | None = None  # the recipe file it came from; not part of the recipe itself

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe data; `validate_recipe(recipe.to_dict())` gives this recipe back."""
        return {
            "model": _compact(self.model),
            "tokenizer": _compact(self.tokenizer),
            "data": _data_dict(self.data),
            "trainer": {
                "kind": self.trainer.kind,
                **self.trainer.args,
                **({"reward": self.trainer.reward} if self.trainer.reward else {}),
            },
            "peft": self.peft,
            "regularizers": [dict(spec) for spec in self.regularizers],
            "output_dir": self.output_dir,
            "resume": self.resume,
            "seed": self.seed,
            **({"eval_during_training": _compact(self.eval_during_training)} if self.eval_during_training else {}),
            **({"importance": _compact(self.importance)} if self.importance else {}),
        }


@dataclass
class StageEvalSpec:
    """`stage_eval:` (staged recipes): a suite run on the starting model and on each stage's final model;
    with every stage's `eval_task` set, the continual-learning matrix R and op / bwt / fwt."""

    suite: str  # suite YAML (eval/suites/*.yaml); absolute after validation
    limit: int | None = None  # documents per task; None = the suite's own limits
    batch_size: int = 8


@dataclass
class Stage:
    """One stage of a staged recipe: a whole validated `Recipe` (its output_dir is `<output_dir>/<index>_<name>`)."""

    index: int
    name: str
    recipe: Recipe
    eval_task: str | None = None  # the task of the stage_eval suite that measures this stage's skill

    @property
    def dir_name(self) -> str:
        return f"{self.index}_{self.name}"


@dataclass
class StagedRecipe:
    """A recipe with `stages:` (llmreg.recipe.stages): the stages run in order, each from the previous one's
    final model. `model`, `tokenizer`, `output_dir` and `seed` are shared; every stage has its own data,
    trainer, peft, regularizers and eval_during_training (already merged over the top-level sections)."""

    stages: list[Stage]
    output_dir: str
    seed: int = 42
    resume: bool = False
    stage_eval: StageEvalSpec | None = None
    path: str | None = None  # the recipe file it came from

    @property
    def model(self) -> ModelSpec:
        return self.stages[0].recipe.model

    @property
    def tokenizer(self) -> TokenizerSpec:
        return self.stages[0].recipe.tokenizer

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe data: the shared keys at the top, each stage's resolved sections in `stages`;
        `validate_recipe(staged.to_dict())` gives this recipe back."""
        stages = []
        for stage in self.stages:
            full = stage.recipe.to_dict()
            stages.append(
                {
                    "name": stage.name,
                    **{k: full[k] for k in STAGE_SECTIONS if k in full},
                    **({"eval_task": stage.eval_task} if stage.eval_task else {}),
                }
            )
        return {
            "model": _compact(self.model),
            "tokenizer": _compact(self.tokenizer),
            "output_dir": self.output_dir,
            "resume": self.resume,
            "seed": self.seed,
            **({"stage_eval": _compact(self.stage_eval)} if self.stage_eval else {}),
            "stages": stages,
        }


# the sections a stage may set (merged over the top-level ones) and those only the top level may set
STAGE_SECTIONS = ("data", "trainer", "peft", "regularizers", "eval_during_training")
TOP_LEVEL_ONLY = ("model", "tokenizer", "output_dir", "seed")


def _data_dict(data: DataSpec) -> dict[str, Any]:
    """`data:` of a resolved recipe: a mixture keeps its list of sources (weights included) and its `mix`."""
    train = [_compact(s) for s in data.train] if isinstance(data.train, list) else _compact(data.train)
    return {
        "train": train,
        **({"mix": _compact(data.mix)} if data.mix is not None else {}),
        **({"eval": _compact(data.eval)} if data.eval is not None else {}),
        **({"pretrain": _pretrain_dict(data.pretrain)} if data.pretrain else {}),
    }


def _pretrain_dict(spec: Any) -> dict[str, Any]:
    out = _compact(spec)
    if spec.synthetic is not None:
        out["synthetic"] = _compact(spec.synthetic)
    return out


def _compact(obj: Any) -> dict[str, Any]:
    """Dataclass fields that are set (None means 'use the default', so it is left out)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None}
