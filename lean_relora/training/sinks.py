"""Optional copies of the metrics records for TensorBoard and Weights & Biases (offline), through their own
libraries, installed as extras: `pip install 'lean-relora[tensorboard]'` / `'lean-relora[wandb]'`.

metrics.jsonl stays the record of a run; a sink receives every record the Reporter writes (progress.py) and logs its
numbers under "<kind>/<key>" (train/loss, eval/eval_loss, restart/retention ...) at the record's step.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from lean_relora.recipe import LogConfig, RecipeError

KINDS = (("restart", "restart"), ("eval", "eval_loss"), ("train", "loss"))


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers, named "<kind>/<key>"; its step is where they are logged."""
    kind = next((kind for kind, key in KINDS if key in record), "other")
    return {f"{kind}/{k}": v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardSink:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """An offline W&B run under RUN_DIR/wandb (`wandb sync` uploads it later). A resumed run starts a new offline run:
    W&B refuses steps below one it has seen, and a resume redoes the steps after its checkpoint."""

    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(mode="offline", dir=str(run_dir), project="lean-relora", name=Path(run_dir).name,
                              config=config, settings=wandb.Settings(silent=True))

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def check_sinks(cfg: LogConfig) -> None:
    """RecipeError (one line) when [log] asks for a sink whose library is not installed; nothing is opened."""
    for wanted, module, key in ((cfg.tensorboard, "tensorboard", "tensorboard = true"),
                                (cfg.wandb, "wandb", f"wandb = '{cfg.wandb}'")):
        if wanted and importlib.util.find_spec(module) is None:
            raise RecipeError(f"log.{key}: the {module} package is not installed; pip install "
                              f"'lean-relora[{module}]' or turn it off")


def open_sinks(cfg: LogConfig, run_dir: Path, config: dict) -> list:
    """The sinks the recipe's [log] asks for (config: the recipe, for W&B's run config)."""
    check_sinks(cfg)
    return ([TensorBoardSink(run_dir)] if cfg.tensorboard else []) + ([WandbSink(run_dir, config)] if cfg.wandb else [])
