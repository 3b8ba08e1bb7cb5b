"""fineweb-edu (HuggingFaceFW/fineweb-edu, sample/10BT): FineWeb's schema plus score/int_score.

The same stages and flags as `pipelines.fineweb`; a new corpus is one `Corpus` like this one.
fineweb-edu is already filtered by FineWeb's chain and its edu classifier, so `tokenize` is the
usual stage (`tokenize --min-int-score 3` keeps the classifier's 3+ rows); `filter` still works.
"""
from .cli import Corpus, main

CORPUS = Corpus(
    name="fineweb-edu",
    hub_repo="HuggingFaceFW/fineweb-edu",
    hub_subset="sample/10BT",
    description="fineweb-edu (FineWeb schema + score, int_score)",
    scores=("score", "int_score"),
)

if __name__ == "__main__":
    raise SystemExit(main(CORPUS))
