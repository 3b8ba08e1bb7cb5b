"""What a run reports, in three places: `console` (the rank-aware `log` lines on stderr), `metrics`
(metrics.jsonl, eval.csv, the progress line, MFU, training.png) and `mirrors` (metrics.jsonl rows
copied to W&B / TensorBoard)."""
