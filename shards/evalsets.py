"""Eval task examples as text, loaded by lm-evaluation-harness itself, and the n-gram index over them.

Tasks resolve the way `trainer.tools.evaluate` resolves them: lm-eval's `TaskManager(include_path=...)`,
so a name means the same task here and in evaluation (a group or tag expands to its tasks). An example's text
is what the harness shows the model plus each answer it scores: `doc_to_text` + target delimiter +
each `doc_to_choice` entry (multiple choice), or + `doc_to_target` (generation), over the task's eval
docs (test split, else validation). lm-eval is imported only when tasks are loaded (`pip install
'shardloom[eval]'`).
"""
from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from pathlib import Path

from .ngrams import NGramIndex, read_info

DEFAULT_NGRAM = 13


MULTIPLE_CHOICE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_choice: "{choices}"
doc_to_target: "{target}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_multiple_choice_task(folder: str | Path, name: str, docs: list[dict] | None = None, *,
                               text: str = "{{question}}", choices: str = "{{choices}}", target: str = "{{answer}}",
                               data: str | Path | None = None) -> Path:
    """A local multiple-choice task in lm-eval's own format (the `--include-path` / `eval.include_path`
    kind): `docs` written as FOLDER/NAME.jsonl (or an existing `data` file named), and FOLDER/NAME.yaml
    scoring acc and acc_norm. `text`, `choices`, `target` are lm-eval's Jinja templates over a doc."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if docs is not None:
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(MULTIPLE_CHOICE_YAML.format(name=name, data=Path(data).resolve(), text=text,
                                                     choices=choices, target=target))
    return yaml_path


class EvalSetError(ValueError):
    """A task that cannot be resolved or loaded: one line naming it."""


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def task_manager(names: list[str], include_path: str | None = None):
    """lm-eval's TaskManager. Indexing the harness's own ~15k task YAMLs takes seconds, so when every
    name is a local task under include_path only that folder is indexed (the same tasks result: the
    names resolve to those YAMLs either way)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalSetError("--decontaminate needs lm-evaluation-harness (pip install 'shardloom[eval]')") from None
    if include_path:
        if not Path(include_path).is_dir():
            raise EvalSetError(f"--include-path {include_path}: not a folder of task YAMLs")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise EvalSetError(f"--decontaminate: unknown task(s) {', '.join(unknown)} "
                           "(lm-eval task names; --include-path DIR for local task YAMLs)")
    return manager


def _text(x) -> str | None:
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], str):  # a multi-turn or multi-target answer
        return "\n".join(x)
    return None


@contextmanager
def compiled_templates():
    """lm-eval compiles a task's Jinja template anew for every doc (about 1 ms each, so 30 s for
    HellaSwag's three templates over 10k docs); while this is active each template string is compiled
    once, in lm-eval's own environment, so the text rendered is the same."""
    from lm_eval import utils

    plain = utils.apply_template
    compiled = functools.lru_cache(maxsize=1024)(utils.env.from_string)
    utils.apply_template = lambda template, doc: compiled(template).render(**doc)
    try:
        yield
    finally:
        utils.apply_template = plain


def example_texts(task) -> list[str]:
    """Every eval doc of one lm-eval task as question + each answer (see the module docstring)."""
    cfg = task.config
    delim = getattr(cfg, "target_delimiter", " ") or " "
    has_choices = getattr(cfg, "doc_to_choice", None) is not None
    out: list[str] = []
    with compiled_templates():
        for doc in task.eval_docs:
            out += _doc_texts(task, doc, delim, has_choices)
    return out


def _doc_texts(task, doc, delim: str, has_choices: bool) -> list[str]:
    """One eval doc's texts: the prompt followed by each answer the harness scores."""
    question, target = task.doc_to_text(doc), task.doc_to_target(doc)
    choices = [c for c in map(_text, task.doc_to_choice(doc) if has_choices else []) if c]
    if isinstance(question, int) and choices:  # multiple_input (winogrande): the contexts vary
        answer = _text(target) or ""
        return [c + delim + answer for c in choices]
    if choices:
        return [f"{_text(question) or ''}{delim}{c}" for c in choices]
    answers = [a for a in map(_text, target if isinstance(target, list) else [target]) if a]
    return [f"{_text(question) or ''}{delim}{a}" for a in answers] or [_text(question) or ""]


def task_texts(names: list[str], include_path: str | None = None) -> dict[str, list[str]]:
    """{name: example texts} for each requested task (a group's tasks pooled under its name)."""
    manager = task_manager(names, include_path)
    out = {}
    for name in names:
        try:
            tasks = manager.load([name])["tasks"]
            out[name] = [t for task in tasks.values() for t in example_texts(task)]
        except EvalSetError:
            raise
        except Exception as e:  # offline hub data, a broken YAML, a template error: one line naming it
            raise EvalSetError(f"--decontaminate: task '{name}' cannot be loaded ({_reason(e)})") from None
        if not out[name]:
            raise EvalSetError(f"--decontaminate: task '{name}' has no eval examples")
    return out


def parse_tasks(value: str) -> list[str]:
    """'arc_easy, piqa' -> ['arc_easy', 'piqa'] (order kept, repeats dropped)."""
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise EvalSetError("--decontaminate: no task names given (e.g. --decontaminate arc_easy,piqa)")
    return list(dict.fromkeys(names))


def build_index(names: list[str], folder: str | Path, include_path: str | None = None,
                n: int = DEFAULT_NGRAM) -> dict:
    """Load the tasks, index their n-grams into `folder` (NGramIndex files) and return index.json's
    contents. Run once, before any executor starts: every worker process then loads the hashes."""
    if n < 1:
        raise EvalSetError(f"--decont-ngram must be >= 1, got {n}")
    index = NGramIndex.build(task_texts(names, include_path), n)
    meta = {"tasks": names, "include_path": str(include_path) if include_path else None}
    index.save(folder, meta)
    return read_info(folder)
