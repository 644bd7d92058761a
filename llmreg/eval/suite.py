"""Evaluation suites: which lm-eval tasks measure the fine-tuning target and which measure retained ability.

A suite YAML (see eval/suites/) has `target` and `retain` lists; each entry is a task name or
`{task, weight, limit, num_fewshot, metric}`. Optional top-level `limit`, `num_fewshot`, `apply_chat_template`
apply to every task that does not set its own. `load_suite` checks all of it without loading a model or data.

A task is known if `eval/tasks/<name>.yaml` exists (a local task over ../shared/data), or, when the hub may be
used (HF_HUB_OFFLINE unset), if lm-eval's task index has it. Local task YAMLs name data files relative to the
repository root (the folder holding `eval/`); lm-eval needs absolute paths, so `write_local_tasks` writes
copies with resolved paths for `TaskManager(include_path=...)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from llmreg.core.options import ConfigError, check_mapping, did_you_mean

PACKAGE_REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class TaskEntry:
    task: str
    weight: float = 1.0
    limit: int | None = None  # documents; None = the suite's limit, else all
    num_fewshot: int | None = None  # None = the suite's, else the task's own default
    metric: str | None = None  # lm-eval metric name (e.g. acc_norm); None = llmreg.eval.run.primary_metric


@dataclasses.dataclass
class _SuiteKeys:
    target: Any = None
    retain: Any = None
    limit: int | None = None
    num_fewshot: int | None = None
    apply_chat_template: bool = False


@dataclasses.dataclass
class Suite:
    path: str
    target: list[TaskEntry]
    retain: list[TaskEntry]
    limit: int | None = None
    num_fewshot: int | None = None
    apply_chat_template: bool = False
    # local task name -> (task YAML text with absolute data paths, folder of the original YAML)
    local_tasks: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    file_hash: str = ""

    @property
    def entries(self) -> list[TaskEntry]:
        return [*self.target, *self.retain]

    def role(self, task: str) -> str:
        return "target" if any(e.task == task for e in self.target) else "retain"


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs: `!function module.name` is kept as its text (we only need data paths)."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def load_suite(path: str | os.PathLike) -> Suite:
    """Parse and check a suite file; raises ConfigError with a one-line message on any problem."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"suite file not found: {path} (looked for {os.path.abspath(path)})")
    raw_bytes = Path(path).read_bytes()
    try:
        raw = yaml.safe_load(raw_bytes) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    keys = check_mapping(_SuiteKeys, raw, path)
    for section in ("target", "retain"):
        if keys.get(section) is None:
            raise ConfigError(f"{path}: missing '{section}' section (a list of tasks)")
    repo = _repo_root(path)
    suite = Suite(
        path=os.path.abspath(path),
        target=_entries(keys["target"], f"{path}: target"),
        retain=_entries(keys["retain"], f"{path}: retain"),
        limit=keys.get("limit"),
        num_fewshot=keys.get("num_fewshot"),
        apply_chat_template=keys.get("apply_chat_template", False),
        file_hash=hashlib.sha256(raw_bytes).hexdigest()[:16],
    )
    for entry in suite.entries:
        local = repo / "eval" / "tasks" / f"{entry.task}.yaml"
        if local.is_file():
            suite.local_tasks[entry.task] = (_resolve_task_yaml(local, repo), str(local.parent))
        else:
            _check_remote_task(entry.task, repo, path)
    return suite


def _repo_root(suite_path: str) -> Path:
    """The nearest folder above the suite that holds eval/tasks (a suite in eval/suites/ of any checkout),
    else the checkout this package lives in."""
    for parent in Path(suite_path).resolve().parents:
        if (parent / "eval" / "tasks").is_dir():
            return parent
    return PACKAGE_REPO


def _entries(items: Any, where: str) -> list[TaskEntry]:
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: expected a non-empty list of tasks, got {items!r}")
    entries = []
    for i, item in enumerate(items):
        item = {"task": item} if isinstance(item, str) else item
        values = check_mapping(TaskEntry, item, f"{where}[{i}]")
        if "task" not in values:
            raise ConfigError(f"{where}[{i}]: missing 'task'")
        if values.get("weight", 1.0) < 0:
            raise ConfigError(f"{where}[{i}].weight: must be >= 0, got {values['weight']}")
        entries.append(TaskEntry(**values))
    return entries


def _resolve_task_yaml(task_file: Path, repo: Path) -> str:
    """The task YAML text with each `dataset_kwargs.data_files` path made absolute (relative to `repo`);
    a missing file is a ConfigError naming it. Text substitution keeps `!function` tags as written."""
    text = task_file.read_text()
    config = yaml.load(text, Loader=_TaskYamlLoader) or {}
    data_files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    files = data_files.values() if isinstance(data_files, dict) else [data_files]
    for rel in {f for v in files for f in ([v] if isinstance(v, str) else v)}:
        absolute = os.path.normpath(rel if os.path.isabs(rel) else os.path.join(repo, rel))
        if not os.path.isfile(absolute):
            raise ConfigError(f"{task_file}: data file not found: {absolute} (written as {rel})")
        text = text.replace(f": {rel}", f": {absolute}")
    return text


def _check_remote_task(task: str, repo: Path, where: str) -> None:
    """Unknown offline = not a local task; online, lm-eval's own index decides as well."""
    known = sorted(p.stem for p in (repo / "eval" / "tasks").glob("*.yaml"))
    if not os.environ.get("HF_HUB_OFFLINE"):
        from lm_eval.tasks import TaskManager

        index = TaskManager().all_tasks
        if task in index:
            return
        known = sorted({*known, *index})
        scope = f"not a local task in {repo / 'eval' / 'tasks'} nor an lm-eval task"
    else:
        scope = (
            f"not a local task in {repo / 'eval' / 'tasks'} (HF_HUB_OFFLINE is set, so lm-eval's hub tasks are "
            "not allowed)"
        )
    raise ConfigError(f"{where}: unknown task '{task}': {scope}" + did_you_mean(task, known))


def write_local_tasks(suite: Suite, folder: str | os.PathLike) -> str:
    """Write the suite's local tasks (resolved YAMLs + their python hook files) into `folder`; return it."""
    os.makedirs(folder, exist_ok=True)
    for name, (text, source_dir) in suite.local_tasks.items():
        Path(folder, f"{name}.yaml").write_text(text)
        for hook in Path(source_dir).glob("*.py"):  # `!function file.fn` resolves next to the YAML
            shutil.copy(hook, Path(folder, hook.name))
    return str(folder)
