"""Data mixtures: `data.train` as a list of sources, mixed by `datasets` into one training set (issue 17).

    data:
      train:
        - {path: gsm8k/train.jsonl, prompt_field: question, completion_field: answer, weight: 0.8}
        - {path: tinystories.txt, skip: 1000, weight: 0.2}        # general text: the replay baseline
      mix: {strategy: interleave, stopping: first_exhausted, seed: 0}

Each source is loaded as a single source would be (its own path, column mapping, `skip`, `max_examples`); the
mixture is then `datasets.interleave_datasets(probabilities=<weights / their sum>, seed, stopping_strategy)` or,
with `strategy: concat`, `datasets.concatenate_datasets` (every row once, sources in order; weights are refused
there). Without weights, interleave alternates one row from each source (datasets' own behaviour). `stopping:
first_exhausted` ends the mixture when the first source runs out; `all_exhausted` repeats the shorter sources until
every row of every source was drawn once.

**Replay.** Fine-tuning on a target task while a share of every batch is general data (text the model was
pre-trained on, or a chat set for an instruct model) is the cheapest defence against forgetting and the baseline
any regularizer must beat: it is exactly a mixture with a general-data source (`recipes/replay/`). `skip` keeps the
replayed rows disjoint from the documents a retain task evaluates.

**One schema.** `interleave_datasets` needs the same columns in every source, so each source is first brought to one
row format (`mixture_format`). For SFT the most structured format present wins. A `messages` source makes every
source `messages` (a prompt / completion pair becomes a user and an assistant turn, plain text an empty user turn
and an assistant turn, so TRL's chat-template path formats all of them, also with templates that require
alternating roles, and `assistant_only_loss` trains every assistant turn; without it a converted prompt /
completion source would be trained on its prompt too, so that is refused unless `completion_only_loss: false`
asks for every token). Otherwise a conversational prompt / completion source (message lists) makes every source a
conversational pair (a plain pair becomes [user] -> [assistant], text [empty user] -> [assistant]): TRL keeps its
completion-only loss there, with any chat template. Otherwise text next to prompt / completion becomes a pair with
an empty prompt (TRL then trains on all of it, as it trains on a text row). Other trainer kinds take no
conversion: their sources must share one format. Departure from a hand-written sampler: none; the draw is
datasets', seeded, so a run's recipe.yaml (which records the sources, weights, strategy, stopping and seed)
rebuilds the same mixture.
"""

from __future__ import annotations

import math
from typing import Any

from llmreg.core.options import ConfigError, check_mapping, did_you_mean
from llmreg.recipe.schema import MIX_STOPPING, MIX_STRATEGIES, MixSpec, SourceSpec, as_chat_turns

# SFT row formats (TRL's dataset formats) and the columns that make each
SFT_COLUMNS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "chat_prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}
# the columns that decide a row format of the other trainer kinds
FORMAT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "answer", "text", "messages")


# -- validation ---------------------------------------------------------------------------------------


def validate_mix(section: Any, sources: list[SourceSpec], seed: int, where: str = "data.mix") -> MixSpec:
    """The `data.mix` of a list of training sources: strategy, stopping and seed checked (closest value for a
    typo), the seed defaulting to the recipe's; weights set on every source or on none, and only for interleave."""
    values = check_mapping(MixSpec, section or {}, where)
    for key, valid in (("strategy", MIX_STRATEGIES), ("stopping", MIX_STOPPING)):
        value = values.get(key)
        if value is not None and value not in valid:
            raise ConfigError(
                f"{where}.{key}: unknown {key} '{value}'" + did_you_mean(value, valid) + f" (one of {', '.join(valid)})"
            )
    spec = MixSpec(**values)
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if spec.strategy == "concat":
        for key in ("stopping", "seed"):
            if values.get(key) is not None:
                raise ConfigError(f"{where}.{key}: only for strategy interleave (concat keeps every row once)")
        if weighted:
            raise ConfigError(
                f"data.train[{weighted[0]}].weight: strategy concat keeps every row once; weights are for "
                "strategy interleave"
            )
        return MixSpec(strategy="concat", stopping=None, seed=None)
    if weighted and len(weighted) < len(sources):
        missing = next(i for i in range(len(sources)) if i not in weighted)
        raise ConfigError(f"data.train[{missing}]: missing weight; set a weight on every source of the list or on none")
    for i in weighted:  # > 0 (and so not NaN) is the field's declared range; infinity would swamp the others
        if not math.isfinite(sources[i].weight):
            raise ConfigError(f"data.train[{i}].weight: must be a positive finite number, got {sources[i].weight}")
    spec.stopping = spec.stopping or "first_exhausted"
    spec.seed = seed if spec.seed is None else spec.seed
    return spec


def probabilities(sources: list[SourceSpec]) -> list[float] | None:
    """The weights normalised to sum to 1, or None when no source has one (interleave then alternates)."""
    if all(s.weight is None for s in sources):
        return None
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]


# -- row formats ----------------------------------------------------------------------------------------


def row_format(columns: list[str], first_row: dict, trainer_kind: str) -> str:
    """The row format of a source (its columns after the column mapping, and its first row)."""
    if trainer_kind == "sft":
        if "messages" in columns:
            return "messages"
        if "prompt" in columns and "completion" in columns:
            return "chat_prompt_completion" if isinstance(first_row.get("prompt"), list) else "prompt_completion"
        return "text"
    if trainer_kind == "hf":
        return "text"
    chat = any(isinstance(first_row.get(c), list) for c in FORMAT_COLUMNS)
    return ("conversational " if chat else "") + " + ".join(c for c in FORMAT_COLUMNS if c in columns)


def mixture_format(formats: list[str | None], trainer_kind: str) -> str | None:
    """The one format the sources of a mixture are brought to (module docstring); a ConfigError naming the
    first source that cannot be. None entries (sources not opened yet: hub, built-in) are skipped; None when
    no format is known."""
    known = [(i, f) for i, f in enumerate(formats) if f is not None]
    if len({f for _, f in known}) <= 1:
        return known[0][1] if known else None
    if trainer_kind != "sft":
        (first, want), (i, got) = known[0], next((i, f) for i, f in known if f != known[0][1])
        raise ConfigError(
            f"data.train[{i}]: its rows are '{got}' but data.train[{first}]'s are '{want}'; the sources of "
            f"a '{trainer_kind}' mixture must share one row format"
        )
    if any(f == "messages" for _, f in known):
        return "messages"
    if any(f == "chat_prompt_completion" for _, f in known):  # keeps TRL's completion-only loss
        return "chat_prompt_completion"
    return "prompt_completion"


def check_trained_tokens(formats: list[str | None], target: str | None, trainer_args: dict) -> None:
    """A prompt / completion source made `messages` loses TRL's completion mask: without `assistant_only_loss`
    its prompt (and the template's tokens) would be trained on, unlike the same source alone. A ConfigError naming
    the first such source, unless the recipe trains on every token anyway (`completion_only_loss: false`)."""
    if (
        target != "messages"
        or trainer_args.get("assistant_only_loss")
        or trainer_args.get("completion_only_loss") is False
    ):
        return
    for i, fmt in enumerate(formats):
        if fmt in ("prompt_completion", "chat_prompt_completion"):
            raise ConfigError(
                f"data.train[{i}]: its prompt / completion rows become chat messages in this mixture, and TRL would "
                "then train on the prompt too; set trainer.assistant_only_loss: true (a chat template with "
                "{% generation %}) or trainer.completion_only_loss: false"
            )


def _converter(source: str, target: str):
    """A row function from `source` format to `target` (None: nothing to convert)."""
    if source == target:
        return None
    if target == "prompt_completion":  # from text
        return lambda row: {"prompt": "", "completion": row["text"]}

    def chat_pair(row: dict) -> dict:
        """[user] -> [assistant] turns, as `data.<role>.chat` makes them (schema.as_chat_turns); text gets an empty
        user turn: templates that require user/assistant alternation (Gemma, Mistral, Llama 2) raise on a
        conversation that opens with the assistant."""
        if source == "chat_prompt_completion":
            return {"prompt": row["prompt"], "completion": row["completion"]}
        if source == "text":
            return as_chat_turns({"prompt": "", "completion": row["text"]})
        return as_chat_turns({"prompt": row["prompt"], "completion": row["completion"]})

    if target == "chat_prompt_completion":  # a conversational pair: TRL trains on the completion only
        return chat_pair

    def messages(row: dict) -> dict:
        pair = chat_pair(row)
        return {"messages": list(pair["prompt"]) + list(pair["completion"])}

    return messages


def _kept_columns(parts: list, target: str, trainer_kind: str) -> list[str]:
    """The columns of the mixture: the format's for SFT and hf; for DPO / GRPO those every source has (a GRPO
    reward function may read extra columns, e.g. the reference answer)."""
    if trainer_kind == "sft":
        return list(SFT_COLUMNS[target])
    if trainer_kind == "hf":
        return ["text"]
    return [c for c in parts[0].column_names if all(c in ds.column_names for ds in parts[1:])]


# -- building -----------------------------------------------------------------------------------------------


def build_mixture(parts: list, sources: list[SourceSpec], spec: MixSpec, trainer_kind: str):
    """One `datasets.Dataset` from the loaded sources (`load_source` of each): converted to one format, then
    interleaved or concatenated as `spec` says."""
    import datasets

    for i, ds in enumerate(parts):
        if len(ds) == 0:
            raise ConfigError(f"data.train[{i}]: no rows left (after skip / max_examples)")
    formats = [row_format(ds.column_names, ds[0], trainer_kind) for ds in parts]
    target = mixture_format(formats, trainer_kind)
    converted = []
    for ds, fmt in zip(parts, formats):
        convert = _converter(fmt, target) if trainer_kind == "sft" else None
        if convert is not None:
            ds = ds.map(convert, remove_columns=ds.column_names, desc=f"Converting to {target}")
        converted.append(ds)
    keep = _kept_columns(converted, target, trainer_kind)
    converted = [ds.select_columns(keep) for ds in converted]
    converted = [_aligned(ds, converted[0].features, i) for i, ds in enumerate(converted)]
    if spec.strategy == "concat":
        return datasets.concatenate_datasets(converted)
    return datasets.interleave_datasets(
        converted, probabilities=probabilities(sources), seed=spec.seed, stopping_strategy=spec.stopping
    )


def _aligned(ds, features, index: int):
    """`ds` with the first source's column types (e.g. an int answer column next to a string one)."""
    if ds.features == features:
        return ds
    try:
        return ds.cast(features)
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"data.train[{index}]: its columns {dict(ds.features)} do not match data.train[0]'s {dict(features)} "
            f"({type(err).__name__})"
        ) from None
