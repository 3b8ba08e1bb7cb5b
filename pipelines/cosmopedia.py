"""cosmopedia-v2 (HuggingFaceTB/smollm-corpus, config cosmopedia-v2) -> token shards.

    python -m pipelines.cosmopedia tokenize --tokenizer data/tokenizers/atom-4096 --output data/shards/cosmopedia-v2

Synthetic textbooks, stories and articles written by an LLM from prompts (`prompt`, `text`,
`token_length`, `audience`, `format`, `seed_data`; no id, no url). No filter chain: the web
heuristics look for web boilerplate, spam and broken extraction, which generated text does not have;
on it they only drop good documents (markdown lists and headings fail the FineWeb line rules, code
samples C4's curly-bracket rule), and there is no URL to judge and one language. `filter` therefore
passes rows through unchanged (counted), and `tokenize` is the usual stage.
"""
from .cli import Corpus, main
from .filters import NO_CHAIN

CORPUS = Corpus(
    name="cosmopedia",
    hub_repo="HuggingFaceTB/smollm-corpus",
    hub_subset="cosmopedia-v2",
    description="cosmopedia-v2 synthetic text (prompt, text, token_length, audience, format, seed_data)",
    chain=NO_CHAIN,
)

if __name__ == "__main__":  # LocalPipelineExecutor uses forkserver: workers re-import this module
    raise SystemExit(main(CORPUS))
