"""UltraData-Math L2-preview (openbmb/UltraData-Math, data/UltraData-Math-L2-preview) -> token shards.

    python -m pipelines.ultradata_math tokenize --tokenizer data/tokenizers/atom-4096 --output data/shards/ultradata-math

Quality-selected math web text: the document is `content`, provenance a JSON `meta` string (url,
timestamp, ...); no id column is documented (the split hashes the text). The dataset mixes English
and Chinese, so `filter` runs the URL filter and English language ID, and none of FineWeb's prose
heuristics (they misfire on formulas, see pipelines/finemath.py).
"""
from .cli import Corpus, main
from .filters import MATH_CHAIN

CORPUS = Corpus(
    name="ultradata-math",
    hub_repo="openbmb/UltraData-Math",
    hub_subset="data/UltraData-Math-L2-preview",
    description="UltraData-Math L2-preview (content, meta JSON)",
    text_key="content",
    chain=MATH_CHAIN,
)

if __name__ == "__main__":  # LocalPipelineExecutor uses forkserver: workers re-import this module
    raise SystemExit(main(CORPUS))
