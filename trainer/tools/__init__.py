"""What runs on a trained model, after (or beside) training: `generate` and `chat` (sampling with a
KV cache), `evaluate` (lm-evaluation-harness on an export), `export` / `hf` (Hugging Face folders,
both ways), `export_c` and `c_tokenizer` (the single-file C runner's format). Each command keeps its
`python -m trainer.<cmd>` entry."""
