"""Score a model with EleutherAI's lm-evaluation-harness (its Python API, its HF backend).

    python -m trainer.evaluate runs/atom --tasks arc_easy,arc_challenge,hellaswag,piqa
    python -m trainer.evaluate exports/atom --tasks my_task --include-path tasks/ --limit 100 --batch-size 8

RUN_OR_EXPORT is anything `trainer.tools.export` reads: a run or checkpoint is exported to a temporary
folder first (fp32), an HF folder is scored as it is. The harness then loads it with its own `hf`
backend (trust_remote_code only for ShardLoom-architecture folders), so the scores are by
construction the ones `lm_eval --model hf` gives on the same export. Writes lm-eval's results JSON
(`"results"` per task) to --output (default: lm_eval.json beside the checkpoint) and prints its table.
Task data comes from the hub unless --include-path points at local task YAMLs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from trainer.tools import hf
from shards.tokenizers import load_tokenizer
from trainer.checkpoint import find_weights, load_model
from trainer.config import from_dict
from trainer.data import DataError
from trainer.evals.bpb import token_byte_lengths
from trainer.evals.val import val_metrics
from trainer.parallel import Dist
from trainer.preflight import load_eval_sets


def evaluate(src: str | Path, tasks: list[str], include_path: str | None = None, limit: float | None = None,
             batch_size: int = 1, device: str = "cpu", output: str | Path | None = None) -> dict:
    """Run the harness on SRC; returns its results dict (also written to `output`)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    folder = find_weights(hf.resolve_hub(str(src)))
    with tempfile.TemporaryDirectory(prefix="shardloom-eval-") as tmp:
        if not hf.is_hf_folder(folder):
            from trainer.tools.export import export

            export(folder, tmp)
            model_dir = Path(tmp)
        else:
            model_dir = folder
        remote = json.loads((model_dir / "config.json").read_text()).get("model_type") == "shardloom"
        manager = TaskManager(include_path=include_path)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"--tasks: unknown task(s) {unknown} (add --include-path DIR for local task YAMLs)")
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "trust_remote_code": remote, "dtype": "float32",
                                    "device": device},
            tasks=tasks, task_manager=manager, limit=limit, batch_size=batch_size, log_samples=False)
    if not hf.is_hf_folder(folder):  # a run or checkpoint knows its sources: bpb on their val split too
        results["bpb"] = val_bpb(folder, device)
    # beside the checkpoint; a hub download is a cache, not a place to write results
    out = Path(output) if output else (Path.cwd() if str(src).startswith("hf://") else folder) / "lm_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=handle_non_serializable, sort_keys=True) + "\n")
    results["output_path"] = str(out)
    return results


def val_bpb(ckpt: Path, device: str = "cpu") -> dict[str, float]:
    """Bits per byte (per source and overall) of a checkpoint on its curriculum's val batches, as the
    training loop measures them; {} when the sources or the tokenizer are not on this machine."""
    cfg = from_dict(json.loads((ckpt / "config.json").read_text()), str(ckpt / "config.json"))
    try:
        eval_sets = load_eval_sets(cfg, Dist())
        tok = load_tokenizer(cfg.to_dict())
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"[evaluate] no bpb: {str(e).splitlines()[0]}", file=sys.stderr)
        return {}
    model = load_model(ckpt, device=device)[0]
    table = token_byte_lengths(tok, cfg.model.vocab_size).to(device)
    return val_metrics(model, eval_sets, table, torch.device(device), contextlib.nullcontext, Dist()).bpb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="run dir, checkpoint dir, HF folder or hf://org/name")
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ap.add_argument("--include-path", default=None, help="folder of extra task YAMLs")
    ap.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", default=None, help="results JSON (default: CHECKPOINT/lm_eval.json)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from lm_eval.utils import make_table
    except ImportError:
        print("error: lm-evaluation-harness is not installed (pip install 'shardloom[eval]')", file=sys.stderr)
        return 2
    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        results = evaluate(args.checkpoint, tasks, args.include_path, args.limit, args.batch_size, args.device,
                           args.output)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(make_table(results))
    if results.get("bpb"):
        print("bits per byte (val): " + ", ".join(f"{k} {v:.4f}" for k, v in results["bpb"].items()))
    print(f"[evaluate] results -> {results['output_path']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
