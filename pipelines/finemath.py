"""finemath-3plus (HuggingFaceTB/finemath, config finemath-3plus) -> token shards.

    python -m pipelines.finemath tokenize --tokenizer data/tokenizers/atom-4096 --output data/shards/finemath-3plus
    python -m pipelines.finemath tokenize --min-score 3.5 ...          # the classifier's float score
    python -m pipelines.finemath tokenize --subset finemath-4plus ...   # another config folder

Math pages from Common Crawl: `text`, `url`, `score` (float) and `int_score` from the finemath
classifier, no id column (the split hashes the text). `filter` runs the URL filter and language ID
only: FineWeb's prose heuristics misfire on formulas (C4's rule drops every page holding "{", i.e.
all LaTeX; Gopher's symbol and alphabetic-word ratios count equations as junk).
"""
from .cli import Corpus, main
from .filters import MATH_CHAIN

CORPUS = Corpus(
    name="finemath",
    hub_repo="HuggingFaceTB/finemath",
    hub_subset="finemath-3plus",
    description="finemath (url, fetch_time, warc_*, text, token_count, char_count, metadata, score, int_score, "
                "crawl, snapshot_type, language, language_score)",
    chain=MATH_CHAIN,
    scores=("score", "int_score"),
)

if __name__ == "__main__":  # LocalPipelineExecutor uses forkserver: workers re-import this module
    raise SystemExit(main(CORPUS))
