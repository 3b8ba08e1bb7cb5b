"""Decoding speed: `trainer.tools.generate` (KV cache, recurrent state) against transformers' `generate()`
on the export of the same model, CPU, greedy, one sequence.

    .venv/bin/python -m bench.generate            # ~1-2 min on 2 cores
    .venv/bin/python -m bench.generate --quick

Rows: Atom at full size with XSA (exported as ShardLoom remote code, so transformers runs our model
behind its generate loop), Atom without XSA (exported as Llama: transformers' own LlamaForCausalLM)
and the tiny hybrid (remote code; DeltaNet state in the cache). Both sides produce the same tokens
(checked); new tokens/s excludes nothing (prefill included), first-token latency is the time from
the call to the first new token. Runs are interleaved and the best of --reps is kept, which on a
shared machine is the least disturbed one. Writes bench/results/generate.json and prints a table.

Seen here (2 cores shared with other jobs, load ~3, 1 thread, 32-token prompt, 128 new tokens, best
of 5): Atom with XSA 219.8 vs 156.6 tok/s (first token 14.5 vs 16.7 ms), Atom as Llama 181.8 vs
129.6 (12.4 vs 15.2 ms), tiny hybrid 220.4 vs 188.7 (5.9 vs 11.2 ms): ours 1.17-1.40x.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from trainer.tools.export import export
from trainer.tools.generate import GenerationConfig, generate
from trainer.models import build_model

ROWS = {
    "atom (XSA, remote code)": {"arch": "dense", "preset": "atom"},
    "atom without XSA (LlamaForCausalLM)": {"arch": "dense", "preset": "atom", "xsa_layers": None},
    "hybrid-tiny (remote code)": {"arch": "hybrid", "preset": "hybrid-tiny", "vocab_size": 4096},
}


def _tokenizer(root: Path) -> Path:
    """Atom's tokenizer shape (4,096-id byte-level BPE, `pipelines.train_tokenizer`) trained on
    Python's own docs, offline."""
    from pydoc_data.topics import topics

    from pipelines.train_tokenizer import train

    return train([topics[k] for k in sorted(topics)], root / "tokenizer")


def _run_dir(root: Path, name: str, section: dict, tokenizer: Path):
    """A run dir with one checkpoint of a random model, written by the trainer's own checkpoint code."""
    from trainer.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(section).eval()
    save_checkpoint(root / name, 1, model, {}, {"model": section, "tokenizer": {"name": str(tokenizer)}})
    return root / name, model


def time_ours(model, prompt, n):
    first = []
    t0 = time.perf_counter()
    out = generate(model, prompt, GenerationConfig(max_new_tokens=n, greedy=True),
                   on_token=lambda t: first.append(time.perf_counter()) if not first else None)
    return out, time.perf_counter() - t0, first[0] - t0


def time_theirs(model, prompt, n):
    from transformers.generation.streamers import BaseStreamer

    class First(BaseStreamer):
        def __init__(self):
            self.calls, self.t = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.t is None:  # the first put is the prompt
                self.t = time.perf_counter()

        def end(self):
            pass

    s = First()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             streamer=s, pad_token_id=0)
    return out[0, len(prompt):].tolist(), time.perf_counter() - t0, s.t - t0


def bench_row(name: str, section: dict, root: Path, tokenizer: Path, args, reps: int) -> dict:
    from transformers import AutoModelForCausalLM

    run, ours = _run_dir(root, name.split()[0] + str(len(section)), section, tokenizer)
    out = root / (run.name + "-hf")
    config = export(run, out)
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=config["model_type"] != "llama",
                                                  dtype=torch.float32).eval()
    prompt = torch.randint(1, 4096, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    best = {"ours": (float("inf"), 0.0), "transformers": (float("inf"), 0.0)}
    for _ in range(reps):  # interleaved, best of reps
        a, t_ours, f_ours = time_ours(ours, prompt, args.new_tokens)
        b, t_theirs, f_theirs = time_theirs(theirs, prompt, args.new_tokens)
        if a != b:
            raise AssertionError(f"{name}: the two greedy continuations differ")
        best["ours"] = min(best["ours"], (t_ours, f_ours))
        best["transformers"] = min(best["transformers"], (t_theirs, f_theirs))
    n = args.new_tokens
    row = {"model": name, "params": ours.num_params(), "export": config["model_type"],
           "ours_tok_s": n / best["ours"][0], "transformers_tok_s": n / best["transformers"][0],
           "ours_first_token_ms": 1e3 * best["ours"][1], "transformers_first_token_ms": 1e3 * best["transformers"][1]}
    row["speedup"] = row["ours_tok_s"] / row["transformers_tok_s"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = 2 if args.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = _tokenizer(root)
        rows = [bench_row(name, section, root, tokenizer, args, reps) for name, section in ROWS.items()]
    print(f"{'model':40s} {'params':>10s} {'ours tok/s':>11s} {'HF tok/s':>9s} {'x':>5s} "
          f"{'ours 1st ms':>11s} {'HF 1st ms':>9s}")
    for r in rows:
        print(f"{r['model']:40s} {r['params']:>10,} {r['ours_tok_s']:>11.1f} {r['transformers_tok_s']:>9.1f} "
              f"{r['speedup']:>5.2f} {r['ours_first_token_ms']:>11.1f} {r['transformers_first_token_ms']:>9.1f}")
    result = {"bench": "generate", "device": "cpu", "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "reps": reps, "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "machine": platform.machine(), "rows": rows}
    out = Path(__file__).parent / "results" / "generate.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
