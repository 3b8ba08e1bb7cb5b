"""Ultra-FineWeb English v1.4 (openbmb/Ultra-FineWeb, data/ultrafineweb_en_v1_4) -> token shards.

    python -m pipelines.ultra_fineweb tokenize --tokenizer data/tokenizers/atom-4096 --output data/shards/ultra-fineweb
    python -m pipelines.ultra_fineweb tokenize --subset data/ultrafineweb_en_v1_4/CC-MAIN-2025-21   # one dump
    python -m pipelines.ultra_fineweb filter --input data/raw/ultra-fineweb --output out/ufw  # FineWeb's chain

Web text (FineWeb re-selected by openbmb's classifier), so `filter` runs FineWeb's whole chain; the
URL filter reads the url inside the JSON `meta` column. The text column is `content` and the id `uid`
(docs/data.md); `--min-score X` thresholds the classifier's `score`.
"""
from .cli import Corpus, main
from .filters import WEB_CHAIN

CORPUS = Corpus(
    name="ultra-fineweb",
    hub_repo="openbmb/Ultra-FineWeb",
    hub_subset="data/ultrafineweb_en_v1_4",
    description="Ultra-FineWeb en v1.4 (content, uid, meta JSON with url, score, source, dataset_index)",
    text_key="content",
    id_key="uid",
    chain=WEB_CHAIN,
    scores=("score",),
)

if __name__ == "__main__":  # LocalPipelineExecutor uses forkserver: workers re-import this module
    raise SystemExit(main(CORPUS))
