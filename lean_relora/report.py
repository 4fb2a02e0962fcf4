"""`lean-relora report`: pictures of one or more runs, and the spectrum of the update a run accumulated.

The curves come from RUN_DIR/metrics.jsonl alone (see progress.py for its records). The spectrum compares two
checkpoints: ReLoRA's claim is that a sum of rank-r cycles is not rank r, and the singular values of W_end - W_start
of one weight matrix show directly whether a run got there.

matplotlib is an optional extra (`pip install 'lean-relora[report]'`): it is imported inside the functions that draw,
never when the package is imported, so training never needs it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METRICS = "metrics.jsonl"
REPORT = "report"  # default output directory, inside the first run directory
EFFECTIVE = 0.01  # singular values above this share of the largest count towards the effective rank
NEEDS_MATPLOTLIB = "lean-relora report needs matplotlib: pip install 'lean-relora[report]'"


class ReportError(ValueError):
    """Bad input to report; the message is one line for the user."""


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, so it works on a headless server and never opens a window.
    Chosen here rather than at import so that importing lean_relora leaves the user's own backend alone."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError(NEEDS_MATPLOTLIB) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------- curves


def read_metrics(run_dir: str | Path) -> dict[str, list[dict]]:
    """The records of a run by kind ("train", "eval", "restart"), each list sorted by step.

    A resumed run re-logs the steps after its checkpoint, so for each (kind, step) the last record wins: it is the
    one the continued run computed. A skipped step logs a null loss (NaN in older files); it plots as a gap."""
    path = Path(run_dir) / METRICS
    if not Path(run_dir).is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise ReportError(f"{run_dir}: no {METRICS}; give a directory that `lean-relora train --run-dir` wrote")
    lines = path.read_text(encoding="utf-8").splitlines()
    latest: dict[tuple[str, int], dict] = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # a run killed mid-write leaves a partial last line: nothing to recover
                break
            raise ReportError(f"{path}: line {number} is not JSON; the file is damaged") from None
        kind = _kind(record)
        if kind is not None and isinstance(record.get("step"), int):  # unknown kinds: a newer version may log more
            latest[kind, record["step"]] = record
    if not latest:
        raise ReportError(f"{path}: holds no records yet")
    return {kind: sorted((r for (k, _), r in latest.items() if k == kind), key=lambda r: r["step"])
            for kind in ("train", "eval", "restart")}


def _kind(record) -> str | None:
    """Which record this is, told by its keys (see progress.py); None for anything else."""
    for kind, key in (("restart", "restart"), ("eval", "eval_loss"), ("train", "loss")):
        if isinstance(record, dict) and key in record:
            return kind
    return None


def column(records: list[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in records], dtype=float)


def restart_tokens(metrics: dict[str, list[dict]]) -> np.ndarray:
    """Where the restarts happened on the token axis. Restart records have only a step; log.every may skip that step,
    so its token count is interpolated between the records that have one (tokens grow linearly with steps)."""
    known = sorted({(0, 0)} | {(r["step"], r["tokens"]) for r in metrics["train"] + metrics["eval"]})
    steps, tokens = zip(*known)
    return np.interp(column(metrics["restart"], "step"), steps, tokens)


def labels(run_dirs: list[Path]) -> list[str]:
    """Run directory names for the legend, or the paths as given where two names are the same."""
    names = [Path(d).resolve().name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def _restart_lines(ax, xs, colour) -> None:
    for x in xs:
        ax.axvline(x, color=colour, linestyle="--", linewidth=0.8, alpha=0.5)


def _restart_legend(ax, runs: dict[str, dict]) -> None:
    from matplotlib.lines import Line2D  # a proxy: one legend entry for all the restart lines of every run

    handles, names = ax.get_legend_handles_labels()
    if any(m["restart"] for m in runs.values()):
        handles, names = handles + [Line2D([], [], color="grey", linestyle="--", linewidth=0.8)], names + ["restart"]
    ax.legend(handles, names, fontsize="small")


def loss_figure(runs: dict[str, dict]):
    """Train loss (line) and eval loss (markers) against tokens, one colour per run, restarts dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, m) in enumerate(runs.items()):
        colour = f"C{i}"
        ax.plot(column(m["train"], "tokens"), column(m["train"], "loss"), color=colour, linewidth=1,
                label=f"{label} train")
        ax.plot(column(m["eval"], "tokens"), column(m["eval"], "eval_loss"), "o--", color=colour, markersize=4,
                label=f"{label} eval")
        _restart_lines(ax, restart_tokens(m), colour)
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title="loss")
    _restart_legend(ax, runs)
    return fig


def step_figure(runs: dict[str, dict], key: str, ylabel: str, title: str):
    """One training-record value (lr, tokens/s) against the step, restarts dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (label, m) in enumerate(runs.items()):
        ax.plot(column(m["train"], "step"), column(m["train"], key), color=f"C{i}", linewidth=1, label=label)
        _restart_lines(ax, column(m["restart"], "step"), f"C{i}")
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    _restart_legend(ax, runs)
    return fig


def save(fig, path: Path) -> Path:
    """Write a PNG through a temporary file and a rename: an interrupted report never leaves half a picture."""
    plt = pyplot()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def out_directory(out_dir: str | Path, create: bool = True) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {out_dir}: exists and is not a directory; choose a directory")
    if create:
        out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def read_runs(run_dirs: list[str | Path]) -> dict[str, dict[str, list[dict]]]:
    """Each run's records (read_metrics) under its legend label."""
    return {label: read_metrics(d) for label, d in zip(labels(run_dirs), run_dirs)}


def plot_runs(runs: dict[str, dict[str, list[dict]]], out_dir: str | Path) -> list[Path]:
    """loss.png, lr.png and throughput.png of the runs (read_runs), overlaid, in out_dir. Returns their paths."""
    out_dir = out_directory(out_dir)
    return [save(loss_figure(runs), out_dir / "loss.png"),
            save(step_figure(runs, "lr", "learning rate", "learning rate"), out_dir / "lr.png"),
            save(step_figure(runs, "tokens_per_s", "tokens/s", "throughput"), out_dir / "throughput.png")]


# ----------------------------------------------------------------------------------------------- spectrum


@dataclass
class Spectrum:
    label: str
    layer: str
    rank: int | None  # the LoRA rank of the layer; None where the newest checkpoint is still dense
    start: str  # what W_start is: a checkpoint name or "initial weights"
    end: str  # the checkpoint W_end comes from
    singular_values: np.ndarray  # of W_end - W_start, descending

    @property
    def effective_rank(self) -> int:
        return int((self.singular_values > EFFECTIVE * self.singular_values[0]).sum())


def spectrum(run_dir: str | Path, layer: str | None = None, label: str | None = None) -> Spectrum:
    """The singular values of W_end - W_start of one weight matrix (default: the first ReLoRA down_proj).

    W_end: the newest intact checkpoint, a ReLoRA layer merged as W + s B A (W the fp32 master where the run kept
    one). W_start: the oldest intact dense checkpoint before it (the end of a full-rank warm start, so the update
    measured is ReLoRA's alone), else the initial weights, which the recipe's seed reproduces. A run without a master
    (relora.fidelity = naive) holds only the quantized base, whose full-rank rounding error shows in the tail."""
    import torch

    from lean_relora import checkpoint
    from lean_relora.export import load_trained, merged_layer
    from lean_relora.relora import ReLoRALinear

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    end, _ = checkpoint.find_latest(run_dir)
    trained = load_trained(end)
    modules = dict(trained.model.named_modules())
    wrapped = [n for n, m in modules.items() if isinstance(m, ReLoRALinear)]
    linear = wrapped + [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n not in wrapped]
    name = layer or next((n for n in linear if n.endswith("down_proj")), None)
    if name not in linear:
        raise ReportError(f"--layer {name}: no such linear layer in {end}; e.g. {', '.join(linear[:3])}"
                          if name else f"{end}: has no down_proj layer; choose a weight matrix with --layer")
    module = modules[name]
    w_end = merged_layer(module).weight.detach() if name in wrapped else module.weight.detach().float()
    recipe, config, rank = trained.recipe, trained.model.config, getattr(module, "rank", None)
    del trained, modules, module  # a large model: keep one copy in memory at a time
    start = _oldest_dense(run_dir, before=end)
    if start is not None:
        from safetensors import safe_open

        with safe_open(start / checkpoint.MODEL, framework="pt") as f:
            w_start = f.get_tensor(f"{name}.weight").float()
    else:
        w_start = initial_weight(recipe, config, name)
    values = torch.linalg.svdvals((w_end - w_start).double()).numpy()
    if values[0] == 0:
        raise ReportError(f"{run_dir}: {name} is the same in {end.name} and "
                          f"{start.name if start else 'the initial weights'}: it did not train; choose another --layer")
    return Spectrum(label or run_dir.resolve().name, name, rank, start.name if start else "initial weights", end.name,
                    values)


def _oldest_dense(run_dir: Path, before: Path) -> Path | None:
    """The oldest intact checkpoint before `before` that holds a dense model (state.json "relora": false)."""
    from lean_relora import checkpoint

    for path in checkpoint.listed(run_dir / checkpoint.CHECKPOINTS):
        if checkpoint.step_of(path) >= checkpoint.step_of(before):
            break
        try:
            checkpoint.verify(path)
        except checkpoint.CheckpointError:
            continue  # a damaged one cannot be trusted; a later dense one still can
        if not checkpoint.read_state(path)["relora"]:
            return path
    return None


def initial_weight(recipe, config, name: str):
    """`name`'s weight as training started, rebuilt as train.setup builds it: seed torch, then build_model.

    setup builds the data in between, but that draws nothing from torch's generator (numpy generators and a seeded
    datasets split), and the vocabulary size and EOS id the model got are in the checkpoint's config, so the corpus
    (perhaps a hub stream) is not read again. tests/test_report.py checks the result against setup itself."""
    import torch

    from lean_relora.model import build_model

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(recipe.train.seed)
        model = build_model(recipe.model, config.vocab_size, recipe.data.seq_len, config.eos_token_id)
    return model.get_submodule(name).weight.detach().float()


def plot_spectrum(spectra: list[Spectrum], out_dir: str | Path) -> Path:
    """spectrum.png: each run's singular values normalised by its largest (log scale), its LoRA rank dotted."""
    plt = pyplot()
    out_dir = out_directory(out_dir)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, s in enumerate(spectra):
        ax.semilogy(np.arange(1, len(s.singular_values) + 1), s.singular_values / s.singular_values[0],
                    color=f"C{i}", linewidth=1.2, label=f"{s.label} ({s.start} -> {s.end}), effective rank "
                    f"{s.effective_rank}")
        if s.rank is not None:
            ax.axvline(s.rank, color=f"C{i}", linestyle=":", label=f"{s.label} LoRA rank {s.rank}")
    ax.axhline(EFFECTIVE, color="grey", linewidth=0.8, linestyle="--", label=f"{EFFECTIVE:.0%} of the largest")
    layers = sorted({s.layer for s in spectra})
    ax.set(xlabel="index", ylabel="singular value / largest",
           title=f"accumulated update W_end - W_start of {', '.join(layers)}")
    ax.legend(fontsize="small")
    return save(fig, out_dir / "spectrum.png")
