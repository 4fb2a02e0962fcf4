"""`lean-relora report --spectrum`: the singular values of the update one weight matrix accumulated.

ReLoRA's claim is that a sum of rank-r cycles is not rank r; the singular values of the update of the ReLoRA phase
(training/merge_log.py records every merged cycle) show directly whether a run got there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lean_relora.tools.report import ReportError, out_directory, outside_legend, pyplot, save_figure

EFFECTIVE = 0.01  # singular values above this share of the largest count towards the effective rank


@dataclass
class Spectrum:
    label: str
    layer: str
    rank: int | None  # the LoRA rank of the layer; None where the newest checkpoint is still dense
    start: str  # where the update is measured from: "ReLoRA, step N", a checkpoint name or "initial weights"
    end: str  # the checkpoint W_end comes from
    singular_values: np.ndarray  # of W_end - W_start, descending

    @property
    def effective_rank(self) -> int:
        return int((self.singular_values > EFFECTIVE * self.singular_values[0]).sum())


def spectrum_of(run_dir: str | Path, layer: str | None = None, label: str | None = None) -> Spectrum:
    """The singular values of the update of one weight matrix (default: the first ReLoRA down_proj) up to the newest
    intact checkpoint.

    A ReLoRA layer of a run that recorded its merges (merge_log.py): the update of the ReLoRA phase alone, the sum of
    s B A over every merged cycle plus the cycle in the checkpoint, exact whatever checkpoints were pruned. Else
    (another layer, or an older run): W_end - W_start, W_end merged as W + s B A (W the fp32 master where the run kept
    one), W_start the oldest intact dense checkpoint before it (the end of a full-rank warm start), else the initial
    weights, which the recipe's seed reproduces; without a master (relora.fidelity = naive) the quantized base's
    full-rank rounding error shows in the tail."""
    import torch

    from lean_relora.model.relora import ReLoRALinear
    from lean_relora.tools.export import load_trained, merged_layer
    from lean_relora.training import checkpoint
    from lean_relora.training import merge_log as merges

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    found = checkpoint.resolve(run_dir)  # verified once; the rebuild takes the value
    end, trained = found.path, load_trained(found)
    modules = dict(trained.model.named_modules())
    wrapped = [n for n, m in modules.items() if isinstance(m, ReLoRALinear)]
    linear = wrapped + [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n not in wrapped]
    name = layer or next((n for n in linear if n.endswith("down_proj")), None)
    if name not in linear:
        raise ReportError(f"--layer {name}: no such linear layer in {end}; e.g. {', '.join(linear[:3])}"
                          if name else f"{end}: has no down_proj layer; choose a weight matrix with --layer")
    module = modules[name]
    recipe, config, rank = trained.recipe, trained.model.config, getattr(module, "rank", None)
    recorded = merges.recorded(run_dir, checkpoint.step_of(end))
    if name in wrapped and len(recorded) == found.state["train_state"]["restarts"]:
        update = module.scale * module.lora_B.detach().cpu().double() @ module.lora_A.detach().cpu().double()
        if recorded:
            update += merges.accumulated(recorded, name)
        start = f"ReLoRA, step {recipe.relora.warm_start_steps}"
    else:
        w_end = merged_layer(module).weight.detach() if name in wrapped else module.weight.detach().float()
        del trained, modules, module  # a large model: keep one copy in memory at a time
        dense = _oldest_dense(run_dir, before=end)
        if dense is not None:
            from safetensors import safe_open

            with safe_open(dense / checkpoint.MODEL, framework="pt") as f:
                w_start = f.get_tensor(f"{name}.weight").float()
        else:
            w_start = initial_weight(recipe, config, name)
        update, start = (w_end - w_start).double(), dense.name if dense is not None else "initial weights"
    values = torch.linalg.svdvals(update).numpy()
    if values[0] == 0:
        raise ReportError(f"{run_dir}: {name} is the same in {end.name} and at {start}: it did not train; choose "
                          "another --layer")
    return Spectrum(label or run_dir.resolve().name, name, rank, start, end.name, values)


def _oldest_dense(run_dir: Path, before: Path) -> Path | None:
    """The oldest intact checkpoint before `before` that holds a dense model (state.json "relora": false)."""
    from lean_relora.training import checkpoint

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

    from lean_relora.model.build import build_model

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
           title=f"accumulated update of {', '.join(layers)}")
    outside_legend(ax)
    return save_figure(fig, out_dir / "spectrum.png")
