"""FineWeb (HuggingFaceFW/fineweb, sample/10BT by default) -> filtered JSONL -> token shards.

    python -m pipelines.fineweb tokenize --tokenizer qwen3                 # hub sample/10BT
    python -m pipelines.fineweb run --input data/fineweb --output out/fineweb --tasks 8
    python -m pipelines.fineweb --help                                      # every stage and flag
"""
from .cli import Corpus, main

CORPUS = Corpus(
    name="fineweb",
    hub_repo="HuggingFaceFW/fineweb",
    hub_subset="sample/10BT",
    description="FineWeb (text, id, dump, url, date, file_path, language, language_score, token_count)",
)

if __name__ == "__main__":  # LocalPipelineExecutor uses forkserver: workers re-import this module
    raise SystemExit(main(CORPUS))
