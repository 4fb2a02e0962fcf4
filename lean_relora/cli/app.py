"""`lean-relora`: the command line, a thin layer over functions the tests call directly.

Every command ends as errors.py says: bad input (recipe, data, arguments) with one line on stderr saying what is
wrong and how to fix it, and exit code 2, nothing that already exists overwritten; a bug with exit code 1 and the path
of a log holding its traceback; a run stopped by a signal with exit code 75 after saving a checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from lean_relora.cli.errors import STOPPED, Outcome, UserError
from lean_relora.cli.run_dir import RunDir, new_run_dir

app = typer.Typer(
    help="Memory-lean ReLoRA pretraining on one GPU: a 4-bit/8-bit frozen base, low-rank cycles merged at restarts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

RecipeArg = Annotated[Optional[Path], typer.Argument(
    metavar="RECIPE", help="Recipe TOML file; omitted: the embedded default (recipes/tiny_cpu.toml, a tiny LLaMA on "
    "CPython's docs).",
    show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override one recipe value, e.g. --set lora.rank=16 (repeatable; TOML syntax for the value).",
    show_default=False)]


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"lean-relora {version('lean-relora')}")
        raise typer.Exit()


@app.callback()
def _commands(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    """Memory-lean ReLoRA pretraining on one GPU."""


def _setup_logging() -> Console:
    console = Console(stderr=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_time=False, show_path=False)], force=True)
    # bnb warns at import about an optional CPU kernel package we do not need.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for client in ("httpx", "httpx2"):  # the hub client logs every request at INFO, which our level would show
        logging.getLogger(client).setLevel(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()  # our own progress is the one to watch; theirs flashes by in a second
    return console


@app.command()
def train(
    recipe: RecipeArg = None,
    set_: SetOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option(
        "--run-dir", help="Directory for metrics, tokenizer and checkpoints \\[default: runs/<recipe>-<time>].",
        show_default=False)] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        "--max-steps", help="Stop after this optimizer step and save a checkpoint; the learning-rate schedule still "
        "runs to train.max_steps, so --resume auto later continues exactly as if never stopped.",
        show_default=False)] = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Continue a run from 'auto' (the newest intact checkpoint of --run-dir), a checkpoint or a "
        "run directory; without RECIPE the checkpoint's own recipe is used.", show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Start even if the memory estimate exceeds the free GPU memory; with --resume, accept recipe "
        "changes that alter the run (model, data, LoRA, optimizer...) or a different --nproc.")] = False,
    nproc: Annotated[int, typer.Option(
        "--nproc", help="Processes to train in, one per GPU (or CPU process): starts torchrun --standalone "
        "--nproc-per-node N; one step then sees N x micro_batch_size x grad_accum_steps sequences.")] = 1,
    gpu_gb: Annotated[Optional[float], typer.Option(
        "--gpu-gb", help="Train with the settings memory-estimate --gpu-gb N --plan picks for a GPU with N GiB free "
        "(a 24 GB card beside a desktop: 22); they go into the checkpoints' recipe.toml, so --resume keeps them.",
        show_default=False)] = None,
):
    """Train a model with ReLoRA as the recipe says, showing progress and writing RUN_DIR/metrics.jsonl.

    Exit codes: 0 done, 2 bad input, 1 failed (see the message), 75 stopped by SIGINT/SIGTERM after saving a
    checkpoint (continue with --resume auto), 130 aborted by a second signal; with --nproc, the first failing
    rank's code."""
    console = _setup_logging()
    with Outcome(console) as outcome:
        from lean_relora.cli.launch import launch
        from lean_relora.memory.estimate import phase_estimates
        from lean_relora.recipe import load_recipe
        from lean_relora.training import distributed
        from lean_relora.training.checkpoint import RECIPE, resolve
        from lean_relora.training.distributed import launched
        from lean_relora.training.loop import train as run_training
        from lean_relora.training.progress import METRICS

        overrides = list(set_ or [])
        if max_steps is not None and max_steps < 1:
            raise UserError(f"--max-steps {max_steps}: must be >= 1")
        if nproc < 1 or (nproc > 1 and launched()):
            raise UserError(f"--nproc {nproc}: must be >= 1, and is not given to a process torchrun started")
        ranks = distributed.join()
        if not ranks.is_main:  # one copy of every line: rank 0's (errors excepted)
            logging.getLogger().setLevel(logging.ERROR)
        if resume is not None and gpu_gb is not None:
            raise UserError("--gpu-gb: plans a new run; a resumed run keeps the settings of its checkpoint's "
                            "recipe.toml (omit --gpu-gb)")
        if resume is not None:
            # Found and verified once: train() takes the value. A launcher checks sizes only; each rank checksums.
            found = resolve(resume, run_dir, checksums=nproc == 1)
            run_dir = run_dir or found.path.parent.parent
            loaded = load_recipe(recipe or found.path / RECIPE, overrides)
        else:
            loaded = load_recipe(recipe, overrides)
            if gpu_gb is not None:  # the plan's --set lines join the others: ranks torchrun starts get them too
                overrides += _planned(loaded, gpu_gb, max(nproc, ranks.size))
                loaded = load_recipe(recipe, overrides)
            run_dir = ranks.broadcast(run_dir or new_run_dir(recipe))  # one directory for the job, named by rank 0
            if (run_dir / METRICS).exists():
                raise UserError(f"--run-dir {run_dir}: already holds a run (metrics.jsonl); choose a new directory "
                                "or continue it with --resume auto")
        if not force:
            _refuse_if_it_does_not_fit(loaded, found.path if resume is not None else None, max(nproc, ranks.size))
        if nproc > 1:  # checked here, before torchrun starts, so that bad input is one line rather than N
            saved = found.ranks if resume is not None else nproc
            if not force and (reason := distributed.resume_refusal(saved, nproc, loaded)):
                raise UserError(reason)
            raise typer.Exit(launch(nproc, recipe, overrides, run_dir, max_steps, resume, force))
        directory = RunDir(run_dir)
        directory.create()
        outcome.log_dir, outcome.on_bad_input = run_dir, directory.discard
        try:
            summary = run_training(loaded, run_dir, resume=found if resume is not None else None, force=force,
                                   stop_at=max_steps, estimate_peaks=phase_estimates)
        finally:
            distributed.leave()
    if summary.stopped_by:
        raise typer.Exit(STOPPED)


def _planned(recipe, gpu_gb: float, nproc: int) -> list[str]:
    """train --gpu-gb: the plan's settings as --set values; nothing fits: bad input, one line."""
    from lean_relora.memory.planner import nothing_fits, plan

    if gpu_gb <= 0:
        raise UserError(f"--gpu-gb {gpu_gb:g}: must be > 0")
    result = plan(recipe, gpu_gb, nproc)
    if result.chosen is None:
        raise UserError(nothing_fits(result))
    sets = [o for o in result.chosen.settings.overrides()
            if result.head_searched or not o.startswith("lora.train_lm_head")]
    logging.getLogger(__name__).info("--gpu-gb %g: the plan, %s (GPU need %.1f GiB): %s", gpu_gb,
                                     result.chosen.settings.describe(), result.chosen.need / 2**30,
                                     " ".join(f"--set {o}" for o in sets))
    return sets


def _refuse_if_it_does_not_fit(recipe, checkpoint: Optional[Path] = None, nproc: int = 1) -> None:
    """Estimate the peak first and refuse a recipe that would not fit the available host RAM or, on a CUDA device,
    the free GPU memory. Resuming, a pretrained model that is no longer a local directory is estimated from the
    checkpoint's config (a moved model directory or an offline hub must not stop a resume). `nproc`: the job's ranks,
    of which those on this host share its RAM."""
    import dataclasses
    import os

    from lean_relora.cli.launch import free_gpu_bytes
    from lean_relora.memory.analytic import VocabUnknown, recipe_vocab_size
    from lean_relora.memory.estimate import refusal
    from lean_relora.memory.host_ram import host_refusal
    from lean_relora.sysmem import available_bytes
    from lean_relora.training.distributed import launched
    from lean_relora.training.step import resolve_device

    if checkpoint is not None and recipe.model.pretrained and not Path(recipe.model.pretrained).is_dir():
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, pretrained=str(checkpoint)))
    try:
        recipe_vocab_size(recipe)  # a missing model.pretrained is an error, not a reason to skip the check
    except VocabUnknown:
        logging.getLogger(__name__).info("memory check skipped: set model.vocab_size to have train check the fit")
        return
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", nproc))  # under torchrun, the ranks of this node
    available = available_bytes()
    reason = host_refusal(recipe, available, ranks_here) if available is not None else None
    device = resolve_device(recipe.train.device)
    if reason is None and device.type == "cuda":
        reason = refusal(recipe, free_gpu_bytes(device, trains_here=nproc == 1 or launched()), nproc)
    if reason:
        raise UserError(reason)


@app.command("memory-estimate")
def memory_estimate(
    recipe: RecipeArg = None,
    set_: SetOpt = None,
    gpu_gb: Annotated[Optional[float], typer.Option(
        "--gpu-gb", help="GPU memory to check the recipe against, in GiB \\[default: 24]; with --plan, the GiB free "
        "on the card (a 24 GB card beside a desktop: 22).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON instead of tables.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="Ranks (train --nproc, one per GPU): GPU figures per GPU, "
                                       "host RAM per rank and per host.")] = 1,
    plan: Annotated[bool, typer.Option(
        "--plan", help="Search micro-batch, checkpointing, offloading, loss chunk (and for continued pretraining "
        "whether lm_head trains) for the fastest settings that fit --gpu-gb, the tokens per step kept; print them "
        "as --set lines for train. Exit 2 when nothing fits.")] = False,
):
    """Predict the peak GPU memory of a recipe (analytic and traced on fake tensors) and whether it fits."""
    console = _setup_logging()
    with Outcome(console):
        from lean_relora.memory.estimate import estimate, render
        from lean_relora.recipe import load_recipe

        if plan and gpu_gb is None:
            raise UserError("--plan: give the GPU memory to plan for, e.g. --gpu-gb 22 (a 24 GB card beside a "
                            "desktop) or --gpu-gb 23.5 (the same card headless)")
        gpu_gb = 24.0 if gpu_gb is None else gpu_gb
        if gpu_gb <= 0:
            raise UserError(f"--gpu-gb {gpu_gb:g}: must be > 0")
        if nproc < 1:
            raise UserError(f"--nproc {nproc}: must be >= 1")
        loaded = load_recipe(recipe, list(set_ or []))
        if plan:
            _print_plan(loaded, recipe, gpu_gb, nproc, as_json)
            return
        result = estimate(loaded, gpu_gb, nproc=nproc)
    if as_json:
        import dataclasses
        import json

        typer.echo(json.dumps(dataclasses.asdict(result) | {"need": result.need, "host_peak": result.host.peak},
                              indent=1))
        return
    out = Console()
    for renderable in render(result, loaded):
        out.print(renderable)


def _print_plan(loaded, path: Optional[Path], gpu_gb: float, nproc: int, as_json: bool) -> None:
    """memory-estimate --plan: the plan's table and --set lines on stdout; nothing fits: one line, exit 2."""
    from lean_relora.memory.planner import nothing_fits, plan_dict, render_plan
    from lean_relora.memory.planner import plan as make_plan

    result = make_plan(loaded, gpu_gb, nproc)
    if as_json:
        import json

        typer.echo(json.dumps(plan_dict(result), indent=1))
    elif result.chosen is not None:
        table, lines = render_plan(result, str(path) if path else None)
        Console().print(table)
        for line in lines:
            typer.echo(line)
    if result.chosen is None:
        raise UserError(nothing_fits(result))


@app.command()
def prepare(
    recipe: RecipeArg = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="New directory for the token files \\[default: prepared/<recipe>].", show_default=False)] = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", help="Stop the train split at the first document end past N tokens; 0 = every document (a "
        "hub stream needs a limit).")] = 0,
):
    """Tokenize the recipe's data once into memory-mapped token files; train on them with
    --set data.source=prepared:OUT."""
    console = _setup_logging()
    with Outcome(console):
        from lean_relora.data.prepare import prepare_data
        from lean_relora.recipe import load_recipe

        loaded = load_recipe(recipe, list(set_ or []))
        out = out or Path("prepared") / (recipe.stem if recipe else "tiny_cpu")
        manifest = prepare_data(loaded.data, out, max_tokens, console, loaded.model.pretrained)
    train, held = manifest["splits"]["train"], manifest["splits"]["eval"]
    if manifest.get("continued_from_documents", {}).get("train"):
        console.print(f"continued an interrupted preparation from train document "
                      f"{manifest['continued_from_documents']['train']:,}", highlight=False)
    console.print(f"prepared {train['tokens']:,} train tokens ({train['documents']:,} documents) and "
                  f"{held['tokens']:,} eval tokens ({held['documents']:,} documents) as {manifest['dtype']} in {out}; "
                  f"train on them with --set data.source=prepared:{out}", highlight=False, soft_wrap=True)


SourceArg = Annotated[Path, typer.Argument(
    metavar="RUN_OR_CHECKPOINT", help="A run directory (its newest intact checkpoint) or one checkpoint directory.",
    show_default=False)]


def _warn_skipped(console: Console, problems: list[str]) -> None:
    for problem in problems:
        console.print(f"warning: skipped damaged checkpoint: {problem}", highlight=False, soft_wrap=True)


@app.command("export")
def export_(
    source: SourceArg,
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="New directory for the Hugging Face model.",
                                            show_default=False)],
    dtype: Annotated[str, typer.Option("--dtype", help="Weight dtype of the export: bf16, fp16 or fp32.")] = "bf16",
    max_shard_size: Annotated[str, typer.Option(
        "--max-shard-size", help="Largest safetensors file written (and host RAM held for it), e.g. 2GB or 500MB.")
    ] = "2GB",
):
    """Merge the LoRA factors into the full-precision weights and write a standard Hugging Face model directory."""
    console = _setup_logging()
    with Outcome(console):
        from transformers.utils import logging as hf_logging

        from lean_relora.tools.export import export_model

        hf_logging.disable_progress_bar()  # a tiny model's "Writing model shards" bar flashes by
        try:
            trained = export_model(source, out_dir, dtype, max_shard_size)
        except OSError as e:  # OUT_DIR where nothing can be written
            raise UserError(f"{out_dir}: cannot be written ({e.strerror or e}); choose a writable directory") from None
    _warn_skipped(console, trained.problems)
    console.print(f"exported {trained.path} to {out_dir} ({dtype}); load it with "
                  "transformers.AutoModelForCausalLM.from_pretrained", highlight=False, soft_wrap=True)


@app.command("eval")
def eval_(
    source: SourceArg,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Evaluate on the held-out split of this data.source instead of the run's (same rules).",
        show_default=False)] = None,
):
    """Print the loss and perplexity of a checkpoint on the eval split."""
    console = _setup_logging()
    with Outcome(console):
        from lean_relora.tools.export import evaluate_checkpoint

        result = evaluate_checkpoint(source, data)
    _warn_skipped(console, result["problems"])
    typer.echo(f"{result['checkpoint']} (step {result['step']}): eval loss {result['eval_loss']:.4f}, "
               f"perplexity {result['eval_ppl']:.2f} on {result['tokens']:,} tokens")


@app.command("report")
def report_(
    run_dirs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR", help="Run directories (metrics.jsonl, checkpoints/); two or more are overlaid.",
        show_default=False)],
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Directory for the PNG files \\[default: the first RUN_DIR/report].", show_default=False)] = None,
    spectrum: Annotated[bool, typer.Option(
        "--spectrum", help="Also plot the singular values of the update each run accumulated in one weight matrix "
        "over the ReLoRA phase; print its effective rank.")] = False,
    layer: Annotated[Optional[str], typer.Option(
        "--layer", help="The weight matrix for --spectrum, e.g. model.layers.1.mlp.down_proj \\[default: the first "
        "ReLoRA down_proj].", show_default=False)] = None,
):
    """Plot loss and eval loss against tokens (restarts marked), learning rate and tokens/s as PNG files."""
    console = _setup_logging()
    from rich.table import Table

    from lean_relora.tools import report
    from lean_relora.tools import spectrum as spectral

    out = out or run_dirs[0] / report.REPORT
    with Outcome(console):
        report.pyplot()
        if layer is not None and not spectrum:
            raise UserError(f"--layer {layer}: only used with --spectrum; add --spectrum")
        runs = report.read_runs(run_dirs)  # every input is checked before any file is written
        report.out_directory(out, create=False)
        spectra = []
        if spectrum:  # the slow part, and it may still find bad input (no checkpoint, unknown layer)
            spectra = [spectral.spectrum_of(d, layer, label) for d, label in zip(run_dirs, report.labels(run_dirs))]
        paths = report.plot_runs(runs, out, report.schedules(run_dirs))
        if spectra:
            paths.append(spectral.plot_spectrum(spectra, out))
    if spectra:
        table = Table(title=f"accumulated update of {', '.join(sorted({s.layer for s in spectra}))}")
        for heading in ("run", "from", "to", "LoRA rank", "effective rank"):
            table.add_column(heading, justify="right" if "rank" in heading else "left", no_wrap=True)
        for s in spectra:
            table.add_row(s.label, s.start, s.end, str(s.rank or "-"), str(s.effective_rank))
        Console().print(table)
        console.print(f"effective rank: singular values above {spectral.EFFECTIVE:.0%} of the largest",
                      highlight=False)
    for path in paths:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
