"""`lean-relora report`: pictures of one or more runs, and the spectrum of the update a run accumulated.

The curves come from RUN_DIR/metrics.jsonl (see training/progress.py for its records), the learning rate from the run's
schedule; spectrum.py measures and draws the update of one weight matrix with the helpers here.

matplotlib is an optional extra (`pip install 'lean-relora[report]'`): it is imported inside the functions that draw,
never when the package is imported, so training never needs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lean_relora.training.progress import METRICS

REPORT = "report"  # default output directory, inside the first run directory
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
    """Which record this is, told by its keys (see training/progress.py); None for anything else."""
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
    outside_legend(ax, handles, names)


def outside_legend(ax, handles=None, names=None) -> None:
    """The legend to the right of the axes, where it covers no data (save_figure keeps it in the picture)."""
    if handles is None:
        handles, names = ax.get_legend_handles_labels()
    ax.legend(handles, names, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


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


def lr_figure(runs: dict[str, dict], schedules: dict[str, tuple] | None = None):
    """The learning rate against the step, drawn from each run's schedule (JaggedCosine at every step, so each
    re-warm shows whole, even between logged steps) where its recipe is known (schedules()), else the logged values;
    the end of the full-rank warm start (solid) and the restarts (dashed) marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    schedules = schedules or {}
    for i, (label, m) in enumerate(runs.items()):
        colour = f"C{i}"
        found = schedules.get(label)
        if found is not None and m["train"]:
            schedule, peak = found
            steps = np.arange(1, int(m["train"][-1]["step"]) + 1)
            # The update of step t uses the rate of schedule(t - 1): the same pairing as the logged records.
            ax.plot(steps, [peak * schedule(int(t) - 1) for t in steps], color=colour, linewidth=1, label=label)
            if 0 < schedule.warm_start_steps <= steps[-1]:
                ax.axvline(schedule.warm_start_steps, color=colour, linewidth=1.2, alpha=0.7,
                           label=f"{label}: warm start ends (step {schedule.warm_start_steps})")
        else:
            ax.plot(column(m["train"], "step"), column(m["train"], "lr"), color=colour, linewidth=1,
                    label=f"{label} (logged steps)")
        _restart_lines(ax, column(m["restart"], "step"), colour)
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    _restart_legend(ax, runs)
    return fig


def schedules(run_dirs: list[str | Path]) -> dict[str, tuple]:
    """Each run's (JaggedCosine, peak lr), under its legend label, from the recipe of its newest checkpoint; runs
    without a checkpoint are left out (lr_figure draws their logged values)."""
    from lean_relora.training import checkpoint
    from lean_relora.training.schedule import JaggedCosine

    found = {}
    for label, run_dir in zip(labels(run_dirs), run_dirs):
        try:
            recipe = checkpoint.saved_recipe(checkpoint.find_latest(Path(run_dir), checksums=False)[0])
        except checkpoint.CheckpointError:
            continue
        found[label] = (JaggedCosine.of(recipe), recipe.optim.lr)
    return found


def save_figure(fig, path: Path) -> Path:
    """Write a PNG through a temporary file and a rename: an interrupted report never leaves half a picture."""
    plt = pyplot()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except OSError as e:
        raise ReportError(f"--out {path.parent}: cannot write {path.name} there ({e.strerror or e}); choose a "
                          "writable directory") from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def out_directory(out_dir: str | Path, create: bool = True) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {out_dir}: exists and is not a directory; choose a directory")
    if not create:
        # Where it does not exist yet, its nearest existing ancestor must be a directory it can be made in.
        ancestor = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
        if not ancestor.is_dir():
            raise ReportError(f"--out {out_dir}: {ancestor} is a file, not a directory; choose a directory")
        return out_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"--out {out_dir}: cannot be created ({e.strerror or e}); choose a writable directory") \
            from None
    return out_dir


def read_runs(run_dirs: list[str | Path]) -> dict[str, dict[str, list[dict]]]:
    """Each run's records (read_metrics) under its legend label."""
    return {label: read_metrics(d) for label, d in zip(labels(run_dirs), run_dirs)}


def plot_runs(runs: dict[str, dict[str, list[dict]]], out_dir: str | Path,
              schedules: dict[str, tuple] | None = None) -> list[Path]:
    """loss.png, lr.png and throughput.png of the runs (read_runs), overlaid, in out_dir. Returns their paths."""
    out_dir = out_directory(out_dir)
    return [save_figure(loss_figure(runs), out_dir / "loss.png"),
            save_figure(lr_figure(runs, schedules), out_dir / "lr.png"),
            save_figure(step_figure(runs, "tokens_per_s", "tokens/s", "throughput"), out_dir / "throughput.png")]
