"""Run metrics: `metrics.jsonl` (every train step and eval), `eval.csv`, a live progress line and
`training.png` (loss, bits per byte, LR, mixture weights and task scores against tokens).

eval.csv has one row per val source and eval (loss, perplexity, bpb; `task` empty) and one row per
task metric and eval (`task`, `metric`, `value`; the val columns empty), so one file holds both.

Rows are appended and flushed as they happen, so a crash loses nothing already logged. On resume,
rows past the checkpoint's step are dropped (they will be produced again by the resumed run), so
the files read as one uninterrupted run.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

EVAL_FIELDS = ["step", "tokens", "source", "loss", "perplexity", "bpb", "task", "metric", "value"]


class MetricsLog:
    """The one logger path: every row goes to metrics.jsonl, then to each of `loggers` (W&B,
    TensorBoard: trainer/telemetry/mirrors.py). Train rows get tokens_per_s and mfu from the previous train row
    (its tokens and time) when `flops_per_token` and `peak` (of all ranks together) are given."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, loggers: list | None = None,
                 flops_per_token: float = 0.0, peak: float = 0.0):
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl = self.dir / "metrics.jsonl"
        self.csv = self.dir / "eval.csv"
        self.loggers = list(loggers or [])
        self.fpt, self.peak = flops_per_token, peak
        self._last: tuple[float, float] | None = None  # (tokens, time) of the previous train row
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        if row.get("type") == "train" and "time" in row:
            if self._last is not None and row["time"] > self._last[1]:
                tok_s = (row["tokens"] - self._last[0]) / (row["time"] - self._last[1])
                row = {**row, "tokens_per_s": tok_s, **({"mfu": self.fpt * tok_s / self.peak} if self.peak else {})}
            self._last = (row["tokens"], row["time"])
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
        for logger in self.loggers:
            logger.write(row)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []

    def log_eval(self, step: int, tokens: int, losses: dict[str, float], bpb: dict[str, float] | None = None,
                 tasks: dict[str, dict[str, float]] | None = None, tasks_seconds: float | None = None) -> None:
        """losses and bpb: per source plus 'overall'; tasks: {task: {metric: value}} (lm-eval's names)."""
        if not self.enabled:
            return
        bpb = bpb or {}
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(EVAL_FIELDS)
            for src, loss in losses.items():
                b = f"{bpb[src]:.6f}" if src in bpb else ""
                w.writerow([step, tokens, src, f"{loss:.6f}", f"{perplexity(loss):.4f}", b, "", "", ""])
            for task, scores in (tasks or {}).items():
                for metric, value in scores.items():
                    w.writerow([step, tokens, "", "", "", "", task, metric, f"{value:.6f}"])
            f.flush()
            os.fsync(f.fileno())
        row = {"type": "eval", "step": step, "tokens": tokens,
               "loss": losses, "perplexity": {k: perplexity(v) for k, v in losses.items()}}
        if bpb:
            row["bpb"] = bpb
        if tasks is not None:
            row["tasks"], row["tasks_seconds"] = tasks, tasks_seconds
        self.log(row)

    def truncate_after(self, step: int) -> int:
        """Drop rows logged after `step` (resume from a checkpoint at `step`, or a restart from step 0
        over a run that died before its first checkpoint). Returns how many metrics.jsonl rows went."""
        self._last = None  # the next train row's tokens/s must not span the dropped steps
        dropped = 0
        if not self.enabled:
            return dropped
        if self.jsonl.exists():
            keep = []
            for line in self.jsonl.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the crash
                    continue
                if row.get("step", 0) <= step:
                    keep.append(line)
                else:
                    dropped += 1
            _atomic_write(self.jsonl, "".join(k + "\n" for k in keep))
        if self.csv.exists():
            with open(self.csv, newline="") as f:
                rows = list(csv.reader(f))
            body = [r for r in rows[1:] if len(r) == len(EVAL_FIELDS) and r[0].isdigit() and int(r[0]) <= step]
            out = [EVAL_FIELDS] + body
            tmp = self.csv.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(out)
            os.replace(tmp, self.csv)
        return dropped

    def rows(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        out = []
        for line in self.jsonl.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


# Dense bf16 tensor-core peaks (FLOP/s, no sparsity), by a fragment of torch.cuda.get_device_name. The
# first match wins, so a variant comes before its family: an H100 PCIe is not an SXM, an L40S is not an L40.
GPU_PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
             ("A10", 125e12), ("4090", 165e12))


def peak_flops(device) -> float | None:
    """The MFU denominator: the accelerator's dense bf16 peak, or None for a GPU not in GPU_PEAKS (no
    invented figure: MFU is left out, and `peak_flops_note` says why). CPU: an fp32 FMA estimate.
    SHARDLOOM_PEAK_FLOPS overrides."""
    env = os.environ.get("SHARDLOOM_PEAK_FLOPS")
    if env:
        return float(env)
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak(name)
    # CPU: ~32 fp32 FLOP/cycle/core (2 AVX2 FMA units) at ~3 GHz
    return torch.get_num_threads() * 32 * 3e9


def gpu_peak(name: str) -> float | None:
    return next((flops for key, flops in GPU_PEAKS if key in name), None)


def peak_flops_note(device) -> str | None:
    """One line for the log when MFU cannot be given (an unknown GPU)."""
    import torch

    if peak_flops(device) is None:
        return (f"[mfu] no peak FLOP/s known for {torch.cuda.get_device_name(device)}: MFU left out "
                f"(set SHARDLOOM_PEAK_FLOPS to its dense bf16 peak)")
    return None


class Progress:
    """The live progress line: step, loss, lr, tokens/s, MFU estimate, ETA."""

    def __init__(self, total_steps: int, start_step: int, tokens_per_step: int, flops_per_token: float, peak: float):
        self.total, self.start = total_steps, start_step
        self.tps_step = tokens_per_step
        self.fpt, self.peak = flops_per_token, peak
        self.t0 = time.perf_counter()
        self.last_t, self.last_step = self.t0, start_step

    def line(self, step: int, loss: float, lr: float, extra: str = "") -> str:
        now = time.perf_counter()
        done = step + 1
        dt = max(now - self.last_t, 1e-9)
        tok_s = (done - self.last_step) * self.tps_step / dt
        self.last_t, self.last_step = now, done
        avg = (now - self.t0) / max(1, done - self.start)
        eta = avg * (self.total - done)
        mfu = f" | MFU {100 * self.fpt * tok_s / self.peak:.1f}%" if self.peak else ""
        return (f"step {done:>6d}/{self.total} | loss {loss:.4f} | lr {lr:.3e} | {fmt_count(tok_s)} tok/s"
                f"{mfu} | ETA {fmt_duration(eta)}{extra}")


def plot(run_dir: str | Path, rows: list[dict] | None = None) -> Path | None:
    """training.png against tokens, one shared x axis: train loss; val bits per byte per source (the
    figure that compares across tokenizers); LR; mixture weights; and, where the run scores tasks,
    their scores right under the mixture, so a schedule's effect reads off one image. Atomic write."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = rows if rows is not None else MetricsLog(run_dir).rows()
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    if not train:
        return None
    panels = [_loss_panel, *([_bpb_panel] if any(e.get("bpb") for e in evals) else []), _lr_panel, _mixture_panel,
              *([_tasks_panel] if any(e.get("tasks") for e in evals) else [])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True)
    for draw, ax in zip(panels, axes):
        draw(ax, train, evals)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("tokens")
    fig.tight_layout()
    out, tmp = run_dir / "training.png", run_dir / "training.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _loss_panel(ax, train, evals) -> None:
    toks, losses = [r["tokens"] for r in train], [r["loss"] for r in train]
    ax.plot(toks, losses, lw=0.6, alpha=0.35, color="tab:blue", label="train")
    ema, sm = 0.0, []
    for i, v in enumerate(losses, 1):  # smoothed train loss: bias-corrected EMA over ~20 rows
        ema = 0.95 * ema + 0.05 * v
        sm.append(ema / (1 - 0.95**i))
    ax.plot(toks, sm, lw=1.5, color="tab:blue", label="train (EMA)")
    val = [e for e in evals if "overall" in e.get("loss", {})]
    if val:
        ax.plot([e["tokens"] for e in val], [e["loss"]["overall"] for e in val], marker="o", ms=3, color="k",
                label="val overall")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)


def _bpb_panel(ax, train, evals) -> None:
    for src in evals[-1].get("bpb") or {}:
        pts = [(e["tokens"], e["bpb"][src]) for e in evals if src in (e.get("bpb") or {})]
        ax.plot(*zip(*pts), marker="o", ms=3, lw=1.5 if src == "overall" else 1, label=f"val {src}")
    ax.set_ylabel("bits per byte")
    ax.legend(fontsize=7)


def _lr_panel(ax, train, evals) -> None:
    ax.plot([r["tokens"] for r in train], [r["lr"] for r in train], color="tab:orange")
    ax.set_ylabel("learning rate")


def _mixture_panel(ax, train, evals) -> None:
    names = sorted({k for r in train for k in r.get("weights", {})})
    for n in names:
        ax.plot([r["tokens"] for r in train], [r.get("weights", {}).get(n, 0.0) for r in train], label=n)
    ax.set_ylabel("mixture weight")
    ax.set_ylim(-0.02, 1.02)
    if names:
        ax.legend(fontsize=7)


def _tasks_panel(ax, train, evals) -> None:
    """acc_norm where a task has it (the cards report it), else acc, else its first metric."""
    scored = [e for e in evals if e.get("tasks")]
    for task in sorted({t for e in scored for t in e["tasks"]}):
        metrics = next(e["tasks"][task] for e in scored if task in e["tasks"])
        m = next((k for k in ("acc_norm", "acc") if k in metrics), next(iter(metrics), None))
        pts = [(e["tokens"], e["tasks"][task][m]) for e in scored if m in e["tasks"].get(task, {})]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"{task} {m}")
    ax.set_ylabel("task score")
    ax.legend(fontsize=7)
