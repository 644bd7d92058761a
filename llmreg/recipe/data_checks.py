"""Data checks before the model loads: open each data source cheaply and refuse what training would choke on.

For one source (`check_source`): the row count and the first rows of a local file, text file or `save_to_disk`
directory; refused with one line naming the recipe key: an empty source, a file that does not parse (the line
number of the first bad JSON line), a column mapping (`text_field`, `prompt_field` / `completion_field`) naming a
missing column (with the closest column name), a `skip` past the last row, a source without the columns its
trainer kind needs after that mapping, a `messages` (or conversational prompt / completion / chosen / rejected)
value that is not a list of {role, content} with known roles, and chat data with a tokenizer that has no chat
template (the tokenizer loads here, only when the data is chat data). For a mixture (`data.train` as a list),
each source as `data.train[i]`, then that their row formats can be brought to one (llmreg.recipe.mixture).
Built-in data is generated in the right format and hub data is not opened (it would need a download).

Without these, each of them failed after the model loaded, with a library traceback (StopIteration,
KeyError: 'text', DatasetGenerationError, "No columns in the dataset match the model's forward method
signature", "Cannot use chat template functions").
"""

from __future__ import annotations

import csv
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any

from llmreg.core.options import ConfigError, did_you_mean
from llmreg.recipe.errors import one_line, reraise_at_recipe_key
from llmreg.recipe.mixture import check_trained_tokens, mixture_format, row_format
from llmreg.recipe.paths import TEXT_EXTENSIONS
from llmreg.recipe.schema import BUILTIN_FORMATS, Recipe, SourceSpec, TokenizerSpec, as_chat_turns

PEEK_ROWS = 20  # rows whose structure is checked
MAX_PARSED_LINES = 200_000  # JSON lines parsed for the first bad one; later lines are only counted
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer")
CHAT_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")
# the column sets each trainer kind can train on (any one of them), after the column mapping
NEEDED_COLUMNS = {
    "hf": (("text",),),
    "sft": (("text",), ("messages",), ("prompt", "completion")),
    "dpo": (("chosen", "rejected"),),
    "grpo": (("prompt",),),
}


@dataclass
class SourcePeek:
    """What validation saw of one source: the row count (None when not known cheaply) and the first rows."""

    rows: int | None
    columns: list[str]
    first_rows: list[dict] = field(default_factory=list)
    chat: bool = False  # conversational data: needs a tokenizer with a chat template


def check_recipe_data(recipe: Recipe) -> None:
    """`check_source` for each data source of a one-run recipe (pre-training data is read by its data mode);
    for a mixture, also that its sources can be brought to one row format (llmreg.recipe.mixture)."""
    if recipe.data.pretrain is not None:
        return
    # a template given through TRL's `trainer.chat_template_path` replaces the tokenizer's own
    has_template_path = recipe.trainer.args.get("chat_template_path") is not None
    tokenizer = None if has_template_path else recipe.tokenizer
    kind = recipe.trainer.kind
    if isinstance(recipe.data.train, list):
        peeks = [check_source(s, f"data.train[{i}]", kind, tokenizer) for i, s in enumerate(recipe.data.train)]
        # hub sources (None) are checked when they load; a built-in SFT source is prompt / completion
        formats = [
            row_format(p.columns, p.first_rows[0] if p.first_rows else {}, kind)
            if p is not None
            else (BUILTIN_FORMATS[kind] if kind == "sft" and s.kind == "builtin" else None)
            for p, s in zip(peeks, recipe.data.train)
        ]
        target = mixture_format(formats, kind)
        if kind == "sft":
            check_trained_tokens(formats, target, recipe.trainer.args)
    else:
        check_source(recipe.data.train, "data.train", kind, tokenizer)
    if recipe.data.eval is not None:
        check_source(recipe.data.eval, "data.eval", kind, tokenizer)


def check_source(
    spec: SourceSpec, where: str, trainer_kind: str, tokenizer: TokenizerSpec | None = None
) -> SourcePeek | None:
    """Check one validated source (module docstring); a ConfigError starting with `where` when it would fail.
    Returns what was seen, or None for built-in and hub sources (not opened)."""
    if spec.kind != "local":
        return None
    peek = peek_local(spec.path, where, spec.split, spec.separator)
    if peek.rows == 0 or (peek.rows is None and not peek.first_rows):
        raise ConfigError(f"{where}: {spec.path} has no rows")
    if spec.skip and peek.rows is not None and spec.skip >= peek.rows:
        raise ConfigError(f"{where}.skip: skips {spec.skip} rows, and {spec.path} has only {peek.rows}")
    peek.columns = _mapped_columns(spec, peek.columns, trainer_kind, where)
    peek.first_rows = [_mapped_row(spec, row, trainer_kind) for row in peek.first_rows]
    _check_needed_columns(peek.columns, trainer_kind, where)
    peek.chat = _check_rows(peek.first_rows, where)
    if peek.chat and tokenizer is not None:
        check_chat_template(tokenizer, where)
    return peek


# -- reading ---------------------------------------------------------------------------------------


def peek_local(path: str, where: str, split: str | None = None, separator: str | None = None) -> SourcePeek:
    """Row count, columns and first rows of a local data file, text file or save_to_disk directory."""
    if os.path.isdir(path):
        return _peek_saved(path, where, split)
    ext = os.path.splitext(path)[1].lower()
    if ext in TEXT_EXTENSIONS:
        from llmreg.recipe.sources import read_text_rows

        with reraise_at_recipe_key(where, (OSError, UnicodeDecodeError)):
            rows = read_text_rows(path, separator)
        return SourcePeek(rows=len(rows), columns=["text"], first_rows=[{"text": r} for r in rows[:PEEK_ROWS]])
    if ext == ".csv":
        return _peek_csv(path, where)
    if ext == ".parquet":
        return _peek_parquet(path, where)
    if ext == ".json":
        whole = _whole_json(path)
        if whole is not None:
            return _peek_json_document(whole, path, where)
    return _peek_json_lines(path, where)


def _peek_json_lines(path: str, where: str) -> SourcePeek:
    rows, first = 0, []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rows += 1
            if number > MAX_PARSED_LINES:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: {path} line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: {path} line {number}: expected a JSON object, got {type(row).__name__}")
            if len(first) < PEEK_ROWS:
                first.append(row)
    return SourcePeek(rows=rows, columns=_union_keys(first), first_rows=first)


def _whole_json(path: str) -> Any:
    """The document of a .json file that holds one JSON value, else None (it may be JSON lines)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _peek_json_document(doc: Any, path: str, where: str) -> SourcePeek:
    if isinstance(doc, list):
        bad = next((i for i, row in enumerate(doc) if not isinstance(row, dict)), None)
        if bad is not None:
            raise ConfigError(f"{where}: {path} item {bad}: expected a JSON object, got {type(doc[bad]).__name__}")
        return SourcePeek(rows=len(doc), columns=_union_keys(doc[:PEEK_ROWS]), first_rows=doc[:PEEK_ROWS])
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):  # {column: [values]}
        n = min(len(v) for v in doc.values())
        first = [{k: v[i] for k, v in doc.items()} for i in range(min(n, PEEK_ROWS))]
        return SourcePeek(rows=n, columns=list(doc), first_rows=first)
    raise ConfigError(f"{where}: {path} holds a JSON {type(doc).__name__}; expected a list of objects or JSON lines")


def _peek_csv(path: str, where: str) -> SourcePeek:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        try:
            first, rows = [], 0
            for row in reader:
                rows += 1
                if len(first) < PEEK_ROWS:
                    first.append(dict(row))
        except csv.Error as err:
            raise ConfigError(f"{where}: {path} line {reader.line_num}: {err}") from None
        return SourcePeek(rows=rows, columns=list(reader.fieldnames or []), first_rows=first)


def _peek_parquet(path: str, where: str) -> SourcePeek:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        batch = next(pf.iter_batches(batch_size=PEEK_ROWS), None)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise ConfigError(f"{where}: cannot read {path} as parquet: {one_line(err)}") from None
    first = batch.to_pylist() if batch is not None else []
    return SourcePeek(rows=pf.metadata.num_rows, columns=list(pf.schema_arrow.names), first_rows=first)


def _peek_saved(path: str, where: str, split: str | None) -> SourcePeek:
    import datasets

    from llmreg.recipe.sources import _pick_split

    with reraise_at_recipe_key(where, (ConfigError, OSError, ValueError, FileNotFoundError)):
        ds = _pick_split(datasets.load_from_disk(path), SourceSpec(path=path, split=split), where.split(".")[-1])
    first = ds.select(range(min(PEEK_ROWS, len(ds)))).to_list()
    return SourcePeek(rows=len(ds), columns=list(ds.column_names), first_rows=first)


def _union_keys(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


# -- checking ----------------------------------------------------------------------------------------


def _renames(spec: SourceSpec, trainer_kind: str) -> dict[str, str]:
    """Source column -> the column the trainer reads (llmreg.recipe.sources.load_source's mapping)."""
    if spec.prompt_field is not None:
        return {
            spec.prompt_field: "prompt",
            spec.completion_field: "answer" if trainer_kind == "grpo" else "completion",
        }
    if spec.text_field is not None:
        return {spec.text_field: "text"}
    return {}


def _mapped_columns(spec: SourceSpec, columns: list[str], trainer_kind: str, where: str) -> list[str]:
    renames = _renames(spec, trainer_kind)
    mapping = (("text_field", spec.text_field), ("prompt_field", spec.prompt_field))
    for key, source in (*mapping, ("completion_field", spec.completion_field)):
        if source is not None and source not in columns:
            raise ConfigError(
                f"{where}.{key}: '{source}' is not a column of {os.path.basename(spec.path)}"
                + did_you_mean(source, columns)
                + f" (columns: {', '.join(columns)})"
            )
    if spec.prompt_field is not None:  # load_source keeps only the two columns
        return list(renames.values())
    return [renames.get(c, c) for c in columns]


def _mapped_row(spec: SourceSpec, row: dict, trainer_kind: str) -> dict:
    renames = _renames(spec, trainer_kind)
    if spec.prompt_field is not None:
        mapped = {renames[k]: row.get(k) for k in (spec.prompt_field, spec.completion_field)}
        if spec.chat:  # as load_source wraps them
            mapped.update(as_chat_turns(mapped))
        return mapped
    return {renames.get(k, k): v for k, v in row.items()}


def _check_needed_columns(columns: list[str], trainer_kind: str, where: str) -> None:
    options = NEEDED_COLUMNS[trainer_kind]
    if any(all(c in columns for c in needed) for needed in options):
        return
    wanted = " or ".join("'" + "' + '".join(needed) + "'" for needed in options)
    hint = "; map yours with text_field or prompt_field/completion_field" if trainer_kind in ("hf", "sft") else ""
    raise ConfigError(f"{where}: trainer kind '{trainer_kind}' needs a {wanted} column, found {columns}{hint}")


def _check_rows(rows: list[dict], where: str) -> bool:
    """Check the structure of the first rows; True when the data is conversational (chat)."""
    chat = False
    for i, row in enumerate(rows, start=1):
        if "text" in row and not isinstance(row["text"], str) and row["text"] is not None:
            raise ConfigError(f"{where}: row {i}: 'text' must be a string, got {type(row['text']).__name__}")
        if "messages" in row and not isinstance(row["messages"], list):
            got = type(row["messages"]).__name__
            raise ConfigError(f"{where}: row {i}: 'messages' must be a list of {{role, content}} messages, got {got}")
        for column in CHAT_COLUMNS:
            if isinstance(row.get(column), list):
                _check_messages(row[column], f"{where}: row {i}: '{column}'")
                chat = True
    return chat


def _check_messages(messages: list, where: str) -> None:
    if not messages:
        raise ConfigError(f"{where} is an empty conversation")
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ConfigError(f"{where}[{j}]: expected a message {{role, content}}, got {msg!r:.80}")
        if msg["role"] not in KNOWN_ROLES:
            raise ConfigError(f"{where}[{j}]: unknown role {msg['role']!r} (one of {', '.join(KNOWN_ROLES)})")


def check_chat_template(spec: TokenizerSpec, where: str) -> None:
    """Chat data is formatted with the tokenizer's chat template: refuse a tokenizer without one."""
    if not _has_chat_template(spec.builtin, spec.name_or_path, spec.gguf_file):
        name = f"builtin:{spec.builtin}" if spec.builtin else spec.name_or_path
        raise ConfigError(
            f"{where}: chat-format data needs a tokenizer with a chat template, and tokenizer {name} has none; "
            "use text or prompt/completion strings, or a chat tokenizer (tokenizer.name_or_path)"
        )


@functools.lru_cache(maxsize=8)
def _has_chat_template(builtin: str | None, name_or_path: str | None, gguf_file: str | None = None) -> bool:
    from llmreg.recipe.models import build_tokenizer

    # gguf_file: a GGUF model's tokenizer (its cache folder); without it the folder holding the .gguf file was
    # opened as a tokenizer folder and failed
    tok = build_tokenizer(TokenizerSpec(name_or_path=name_or_path, builtin=builtin, gguf_file=gguf_file))
    return bool(getattr(tok, "chat_template", None))
