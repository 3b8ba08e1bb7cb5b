"""Run loggers: Weights & Biases and TensorBoard mirrors of metrics.jsonl, off by default.

    logging:
      wandb: {project: shardloom, name: atom-1}   # pip install -e '.[wandb]'  (WANDB_MODE=offline: local only)
      tensorboard: runs/atom/tb                    # pip install -e '.[tensorboard]'

MetricsLog hands each row it writes to every logger here (rank 0 only: only rank 0's MetricsLog is
enabled), so both hold what metrics.jsonl holds, under the optimizer step:
  train/loss, train/lr, train/tokens_per_s, train/mfu, train/grad_norm, mixture/<source> (weights)
  val/<source> and val/overall (loss), val_ppl/<source>
  tokens/<source> (tokens drawn per source, at each eval)
A missing package is one line before step 0. The W&B run id is kept in RUN/wandb_id, so a resumed
run continues the same W&B run (W&B drops steps it has already seen).
"""
from __future__ import annotations

import uuid
from pathlib import Path

from trainer.config import Config, ConfigError


def scalars(row: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl row, by the names above."""
    kind, out = row.get("type"), {}
    if kind == "train":
        for key in ("loss", "lr", "tokens_per_s", "mfu", "grad_norm", "tokens"):
            if row.get(key) is not None:
                out[f"train/{key}"] = float(row[key])
        out.update({f"mixture/{k}": float(v) for k, v in (row.get("weights") or {}).items()})
    elif kind == "eval":
        out.update({f"val/{k}": float(v) for k, v in row["loss"].items()})
        out.update({f"val_ppl/{k}": float(v) for k, v in row.get("perplexity", {}).items()})
        out.update({f"val_bpb/{k}": float(v) for k, v in row.get("bpb", {}).items()})
        out.update({f"tasks/{t}/{m}": float(v) for t, ms in (row.get("tasks") or {}).items() for m, v in ms.items()})
        if row.get("tasks_seconds") is not None:
            out["tasks/seconds"] = float(row["tasks_seconds"])
    elif kind == "mixture":
        out.update({f"tokens/{k}": float(v) for k, v in row["tokens_by_source"].items()})
    return out


class TensorBoardLogger:
    def __init__(self, logdir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir))

    def write(self, row: dict) -> None:
        for k, v in scalars(row).items():
            self.writer.add_scalar(k, v, global_step=row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, cfg: Config, run_dir: Path):
        import wandb

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        w = cfg.logging.wandb
        self.run = wandb.init(project=w.project, name=w.name, entity=w.entity, id=run_id, resume="allow",
                              dir=str(run_dir), config=cfg.to_dict())
        id_file.write_text(run_id + "\n")

    def write(self, row: dict) -> None:
        if values := scalars(row):
            self.run.log(values, step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


def open_loggers(cfg: Config, run_dir: Path) -> list:
    """The loggers `logging:` asks for (call on rank 0 only)."""
    out = []
    try:
        if cfg.logging.tensorboard:
            out.append(TensorBoardLogger(cfg.logging.tensorboard))
        if cfg.logging.wandb is not None:
            out.append(WandbLogger(cfg, Path(run_dir)))
    except ImportError as e:
        which = "wandb" if "wandb" in str(e) else "tensorboard"
        raise ConfigError(f"{cfg.source_file}: logging.{which}: the {which} package is not installed "
                          f"(pip install -e '.[{which}]')") from None
    return out
