"""Evaluations that run inside the training loop, on the live model: `bpb` turns the validation loss
into bits per byte (a tokenizer-independent number, from a per-id byte table built once at start-up),
and `tasks` scores lm-evaluation-harness tasks on the in-memory model, with the same request encoding
as lm-eval's own HF backend on an export and lm-eval's own evaluator, sharded over the ranks."""
