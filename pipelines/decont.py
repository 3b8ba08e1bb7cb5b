"""`--decontaminate TASK[,TASK]`: drop every document that shares an n-gram with an eval task example.

The tasks are lm-eval's (`shards.evalsets`: `TaskManager(include_path=...)`, as `trainer.tools.evaluate`
resolves them); their examples (question + each answer) are indexed once, in the command's own process
before any executor starts (a task that cannot load is one error line there), into LOGS/decont/ as
sorted uint64 n-gram hashes (`shards.ngrams.NGramIndex`). Each worker process loads those hashes once;
`Decontaminate` looks documents up a batch at a time.

Why not datatrove's `NGramsDecontIndexer`/`NGramsDecontFilter`: the indexer reads tasks through
lighteval (`lighteval` registry names and its prompt functions), while our models are scored by
lm-eval, whose task names, templates and answer sets differ; indexing lighteval's version of a task
would decontaminate against text the evaluation never shows. Its filter also hashes every n-gram as a
joined string in Python after spaCy word splitting, a few MB/s, which would dominate tokenizing. We keep
its idea and its exclusion/stat conventions (a BaseFilter, `dropped_contaminated`, removed documents
with the matching n-gram in their metadata) over the faster index.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from datatrove.pipeline.filters.base_filter import BaseFilter

_LOADED: dict[str, object] = {}  # index folder -> NGramIndex, once per worker process


def load_index(folder: str):
    from shards.ngrams import NGramIndex, read_info

    key = f"{folder}@{read_info(folder)['sha256']}"  # a rebuilt index in the same folder loads anew
    if key not in _LOADED:
        _LOADED[key] = NGramIndex.load(folder)
    return _LOADED[key]


class Decontaminate(BaseFilter):
    """Drop documents sharing an n-gram with the index in `index_folder`, counted as
    `dropped_contaminated` and per task `dropped_contaminated_<task>`; a dropped document carries
    `contaminated_tasks` and `contaminated_ngram` (the first matching n-gram's words) to the exclusion
    writer."""

    name = "🧪 Decontaminate (n-grams)"

    def __init__(self, index_folder: str, exclusion_writer=None, batch_size: int = 1000):
        super().__init__(exclusion_writer, batch_size=batch_size)
        self.index_folder = str(index_folder)
        self._index = None
        self._counts: dict[str, int] = {}

    def filter(self, doc):
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch):
        if self._index is None:
            self._index = load_index(self.index_folder)
        hits = self._index.find([d.text if isinstance(d.text, str) else "" for d in batch])
        out = []
        for doc, hit in zip(batch, hits):
            if hit is None:
                out.append(True)
                continue
            tasks, ngram = hit
            doc.metadata["contaminated_tasks"] = ",".join(tasks)
            doc.metadata["contaminated_ngram"] = ngram
            for task in tasks:
                self._counts[f"dropped_contaminated_{task}"] = self._counts.get(f"dropped_contaminated_{task}", 0) + 1
            out.append((False, "contaminated"))
        return out

    def run(self, data, rank: int = 0, world_size: int = 1):
        """BaseFilter.run with its counts kept locally and flushed once per task: its three stat
        updates and a length statistic per document cost more than the lookup itself."""
        from datatrove.utils.batching import batched

        self._counts = {"total": 0, "forwarded": 0, "dropped": 0}
        try:
            with self.exclusion_writer if self.exclusion_writer else contextlib.nullcontext() as writer:
                for batch in batched(data, self.batch_size):
                    with self.track_time("batch"):
                        results = self.filter_batch(batch)
                    self._counts["total"] += len(batch)
                    for doc, res in zip(batch, results):
                        if res is True:
                            self._counts["forwarded"] += 1
                            yield doc
                            continue
                        self._counts["dropped"] += 1
                        self._counts["dropped_contaminated"] = self._counts.get("dropped_contaminated", 0) + 1
                        doc.metadata["filter_reason"] = "contaminated"
                        if writer:
                            writer.write(doc, rank)
        finally:
            for label, n in sorted(self._counts.items()):
                self.stat_update(label, value=n)


def prepare(spec) -> dict:
    """Build the index for a DecontSpec (once, here, before any executor) and return what the manifest
    and the run settings record: tasks, n, include path, counts per task, sha256 of the hashes."""
    from shards.evalsets import EvalSetError, build_index

    from .readers import InputError

    try:
        info = build_index(list(spec.tasks), spec.folder, spec.include_path, spec.n)
    except EvalSetError as e:
        raise InputError(str(e)) from None
    return record(info)


def record(info: dict) -> dict:
    """index.json as a manifest records one decontamination pass."""
    return {"tasks": info["tasks"], "ngram": info["n"], "include_path": info.get("include_path"),
            "words": "lowercased, punctuation stripped (shards.text.word_bytes)",
            "examples": {t: c["examples"] for t, c in info["counts"].items()},
            "too_short": {t: c["too_short"] for t, c in info["counts"].items()},
            "index_sha256": info["sha256"]}


def step(spec, output: str, storage_options: dict | None = None) -> Decontaminate:
    from .filters import removed_writer

    return Decontaminate(spec.folder, exclusion_writer=removed_writer(output, "decontaminate", storage_options))


def filter_name(spec) -> str:
    """What a manifest's `filters` list says about the pass."""
    return f"decontaminate: {','.join(spec.tasks)} ({spec.n}-gram words, lm-eval examples)"


def dropped_counts(stats_dir: str | Path | None, tasks) -> dict[str, int] | None:
    """Documents dropped per task, from a finished stage's datatrove stats; None when they are gone
    (or remote), rather than zeros that would read as "nothing was contaminated"."""
    from .cli import read_stats

    stats = read_stats(str(stats_dir)) if stats_dir else []
    if not stats:
        return None
    totals = {t: 0 for t in tasks}
    for _name, s in stats:
        for task in tasks:
            totals[task] += s.get(f"dropped_contaminated_{task}", 0)
    return totals
