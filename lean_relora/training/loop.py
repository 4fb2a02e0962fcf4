"""The training loop: optional full-rank warm start, then ReLoRA cycles (train, merge, reset, re-warm).

`train(recipe, run_dir)` is the whole run; the CLI is a thin layer over it. Everything the loop needs is built in
`setup` and passed along; nothing lives at module level.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers import PretrainedConfig

from lean_relora.data.packing import build_data
from lean_relora.model.build import DTYPES, build_model, prepare_model, pretrained_config
from lean_relora.model.loss import output_head
from lean_relora.model.master import LIVE_MASTERS, DiskMasters
from lean_relora.model.relora import (
    relora_layers,
    set_trainable,
    target_modules,
    target_summary,
    wrap_model,
)
from lean_relora.model.streamed import TensorSource, empty_pretrained, fill_remaining, streamable, streams
from lean_relora.recipe import Recipe, RecipeError
from lean_relora.sysmem import map_large_allocations
from lean_relora.training import checkpoint
from lean_relora.training import merge_log as merges
from lean_relora.training.distributed import SOLO, Ranks, join, resume_refusal
from lean_relora.training.optim import build_optimizer, set_lr
from lean_relora.training.peak import PeakEstimates, PeakMemory
from lean_relora.training.progress import METRICS, Reporter, RunSummary, command, drop_records_after
from lean_relora.training.restart import gradient_init, restart
from lean_relora.training.run import Run, TrainState
from lean_relora.training.schedule import JaggedCosine
from lean_relora.training.sinks import check_sinks, open_sinks
from lean_relora.training.step import evaluate, resolve_device, train_step, wrap_for_ranks

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """More than checkpoint.max_bad_steps steps in a row had a NaN/inf loss or gradient."""


class StopRequest:
    """SIGINT/SIGTERM while armed: the loop finishes its step, saves a checkpoint and returns. A second signal aborts
    at once. The previous handlers come back when the `with` block ends."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def arm(self) -> None:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        os.write(2, f"{self.signal}: finishing this step, then saving a checkpoint (again to abort)\n".encode())

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def setup(recipe: Recipe, run_dir: Path, config: PretrainedConfig | None = None, ranks: Ranks = SOLO) -> Run:
    """The run's data, model, schedule and optimizer. `config` (a checkpoint's, on resume) builds the model from it
    instead of reading model.pretrained, whose weights the checkpoint holds anyway. `ranks`: the job's processes."""
    if recipe.model.pretrained and config is None:
        pretrained_config(recipe.model.pretrained)  # a wrong path or hub name fails now, not after reading the corpus
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    map_large_allocations()
    torch.manual_seed(recipe.train.seed)
    device = ranks.device(resolve_device(recipe.train.device))
    if recipe.optim.name == "paged_adamw8bit" and device.type != "cuda":
        # The default recipe names it and runs anywhere: a CPU run using ordinary 8-bit state is expected, not news.
        log.debug("paged_adamw8bit pages its state through CUDA unified memory; on %s it keeps ordinary 8-bit state",
                  device.type)
    with ranks.main_first():  # rank 0 fills the run directory's caches (tokenizer, tokenized data) for the others
        data, tokenizer = build_data(recipe.data, run_dir, recipe.model.pretrained)
    vocab_size = recipe.model.vocab_size or data.vocab_size
    if vocab_size < data.vocab_size and not recipe.model.pretrained:  # a pretrained model has its own vocab_size
        raise RecipeError(f"model.vocab_size = {vocab_size}: smaller than the tokenizer's {data.vocab_size} tokens; "
                          "set it to 0 or at least that")
    source = None
    dtype = DTYPES[recipe.model.dtype]
    if config is None and streams(recipe):
        model, source = empty_pretrained(recipe.model.pretrained, dtype)  # filled layer by layer in start_relora
        prepare_model(model, recipe.model, vocab_size, recipe.data.seq_len)
    else:
        model = build_model(recipe.model, vocab_size, recipe.data.seq_len, tokenizer.eos_token_id, config)
    if recipe.train.loss_chunk_tokens:
        output_head(model)  # a model the chunked loss cannot compute through is refused now, in one line
    selection, warning = target_summary(model, recipe.lora.targets)
    log.info(selection)
    if warning:
        log.warning(warning)
    schedule = JaggedCosine.of(recipe)
    run = Run(recipe, device, data, model, None, schedule, torch.Generator().manual_seed(recipe.train.seed),
              TrainState(), run_dir, ranks=ranks)
    if recipe.relora.warm_start_steps > 0:
        start_warm(run)
    else:
        start_relora(run, source)
    return run


def start_warm(run: Run) -> None:
    """The full-rank warm start: the dense model on the device, every weight trained. Its optimizer never pages:
    bnb frees no paged buffer, and this state must be gone when ReLoRA begins."""
    run.model = run.model.to(run.device)
    run.optimizer = build_optimizer(run.model, run.recipe.optim, run.device, paged=False)
    run.ddp = wrap_for_ranks(run)


def start_relora(run: Run, source: TensorSource | None = None) -> None:
    """Quantize the base, add LoRA factors, freeze what must not train, and build a fresh optimizer for the rest.
    With `source` the model's parameters are still on meta: each is read from the pretrained files as it is needed."""
    recipe = run.recipe
    run.optimizer = run.ddp = None  # free the full-rank optimizer state (and DDP's gradient buckets) before quantizing
    keep_master = recipe.keeps_master
    on_disk = keep_master and recipe.relora.master == "disk"
    if on_disk and run.run_dir is None:
        raise RecipeError('relora.master = "disk": needs a run directory to keep the masters in')
    dtype = DTYPES[recipe.model.dtype]
    fill = None if source is None else lambda name, linear: source.fill(name, linear, run.device, dtype)
    wrap_model(run.model, recipe.lora, keep_master=keep_master, dtype=dtype, device=run.device,
               generator=run.generator, master_store=DiskMasters(run.run_dir / LIVE_MASTERS) if on_disk else None,
               materialize=fill, owned=run.ranks.owned(target_modules(run.model, recipe.lora.targets)),
               projected=recipe.relora.cycle == "projected")
    if source is not None:
        fill_remaining(run.model, source, run.device, dtype)
    run.model.to(run.device)
    set_trainable(run.model, recipe.lora)
    if recipe.model.gradient_checkpointing and not recipe.lora.train_embeddings:
        run.model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    run.optimizer = build_optimizer(run.model, recipe.optim, run.device)
    run.ddp = wrap_for_ranks(run)


def train(recipe: Recipe, run_dir: Path, reporter: Reporter | None = None,
          resume: str | Path | checkpoint.Checkpoint | None = None, force: bool = False,
          stop_at: int | None = None, estimate_peaks: PeakEstimates | None = None) -> RunSummary:
    """Run the recipe to `train.max_steps` (or stop after step `stop_at`, saving a checkpoint: the schedule still
    ends at train.max_steps, so a run stopped there and resumed is the uninterrupted run); metrics go to
    run_dir/metrics.jsonl. Returns the summary.

    Checkpoints go to run_dir/checkpoints every `checkpoint.every` steps, at the end, and when SIGINT/SIGTERM stops
    the run (after the current step; the summary's stopped_by then names it). `resume`: "auto" (the newest intact
    checkpoint of run_dir), a checkpoint or a run directory; `force` accepts recipe changes that alter the run.
    `estimate_peaks(recipe, vocab, device, ranks)`: what each phase's measured peak is recorded beside
    (memory/estimate.phase_estimates, which the command line passes); None: the peaks are recorded alone."""
    with StopRequest() as stop:
        return _train(recipe, Path(run_dir), reporter, resume, force, stop, stop_at or recipe.train.max_steps,
                      estimate_peaks)


def _train(recipe: Recipe, run_dir: Path, reporter: Reporter | None, resume, force: bool, stop: StopRequest,
           end: int, estimate_peaks: PeakEstimates | None) -> RunSummary:
    if end > recipe.train.max_steps:
        raise RecipeError(f"--max-steps {end}: beyond train.max_steps ({recipe.train.max_steps}), where the learning "
                          f"rate schedule ends; to train longer raise it: --set train.max_steps={end}")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ranks = join()
    if ranks.several and recipe.relora.init == "gradient":  # each rank would sketch its own micro-batches
        raise RecipeError('relora.init = "gradient": not yet supported with several ranks; use "random" with --nproc')
    # A resume is checked before setup: a refused data change must not reach the run's tokenizer cache.
    found, lines = _check_resume(recipe, run_dir, resume, force, ranks.size) if resume is not None else (None, [])
    check_sinks(recipe.log)  # a missing optional library is bad input: refused before the costly setup
    # A resumed run's weights come from the checkpoint. A pretrained model still in its directory is streamed from
    # there (host RAM: one layer); one that moved, or a hub name, is built from the checkpoint's config instead.
    rebuild = found and recipe.model.pretrained and not streamable(recipe.model.pretrained)
    run = setup(recipe, run_dir, checkpoint.saved_config(found.path) if rebuild else None, ranks)
    if found is not None and ranks.is_main:  # records of steps the resumed run redoes (killed past the checkpoint) go
        drop_records_after(run_dir / METRICS, found.step)
    if not ranks.is_main:  # logging, progress and metrics come from rank 0
        reporter = Reporter(Path(os.devnull), end, console=Console(file=io.StringIO()), live=False)
    reporter = reporter or Reporter(run_dir / METRICS, end,
                                    sinks=open_sinks(recipe.log, run_dir, recipe.to_dict()))
    reporter.line(f"run dir: {run_dir}")
    saved_step = _resume(run, found, lines, reporter) if found is not None else None
    vocab = run.model.get_input_embeddings().num_embeddings
    estimates = estimate_peaks(recipe, vocab, run.device, ranks.size) if estimate_peaks and ranks.is_main else {}
    peaks = PeakMemory(recipe, run.device, estimates, reporter)
    saved_path = found.path if found is not None else None
    state, schedule = run.state, run.schedule
    if state.step >= end and end < recipe.train.max_steps:
        raise RecipeError(f"--max-steps {end}: the run is already at step {state.step}; give a later step")
    if resume is None:
        _eval(run, reporter)
    window_start, window_tokens, window_wait = time.perf_counter(), state.tokens, run.loader.wait_seconds
    loop_start, loop_tokens, loss = window_start, window_tokens, None
    reporter.start(state.step, state.restarts, schedule)
    stop.arm()
    while state.step < end:
        if state.step == recipe.relora.warm_start_steps and recipe.relora.warm_start_steps > 0:
            start_relora(run)
            reporter.line(f"step {state.step}: full-rank warm start done, ReLoRA begins")
            if recipe.relora.init == "gradient":
                init = gradient_init(run)
                reporter.line(f"step {state.step}: A from the gradient ({init['init_tokens']:,} tokens, "
                              f"{init['init_seconds']:.2f} s)")
        elif (state.step == 0 and recipe.relora.warm_start_steps == 0 and recipe.relora.cycle == "projected"
              and recipe.relora.init == "gradient"):
            # A projected cycle without a warm start projects from its first step, as GaLore does.
            init = gradient_init(run)
            reporter.line(f"step 0: P = A^T from the gradient ({init['init_tokens']:,} tokens, "
                          f"{init['init_seconds']:.2f} s)")
        elif schedule.is_restart(state.step):
            if ranks.is_main:  # what report --spectrum sums, whatever checkpoints remain
                merges.record(run.model, run_dir, state.step)
            reporter.restart(restart(run))
            peaks.restarted(state.step)
        lr = recipe.optim.lr * schedule(state.step)
        set_lr(run.optimizer, lr)
        loss = train_step(run)
        reporter.tick(state.step, state.restarts)
        if state.bad_steps:
            limit = recipe.checkpoint.max_bad_steps
            reporter.line(f"step {state.step}: loss {loss} or its gradient is not finite; step skipped "
                          f"({state.bad_steps} in a row, checkpoint.max_bad_steps = {limit})")
            if state.bad_steps > limit:
                run.loader.close()
                path = checkpoint.save(run, run_dir, recipe.checkpoint.keep_last)
                raise TrainingDiverged(
                    f"step {state.step}: {state.bad_steps} steps in a row had a NaN/inf loss or gradient "
                    f"(checkpoint.max_bad_steps = {limit}); the weights and optimizer state of the last good step are "
                    f"saved in {path}; lower optim.lr (needs --force) or raise the limit, then --resume auto")
        if state.step % recipe.log.every == 0 or state.step == end:
            now = time.perf_counter()
            speed = (state.tokens - window_tokens) / max(now - window_start, 1e-9)
            wait, window_wait = run.loader.wait_seconds - window_wait, run.loader.wait_seconds
            window_start, window_tokens = now, state.tokens
            reporter.step({"step": state.step, "loss": loss, "lr": lr, "tokens": state.tokens,
                           "tokens_per_s": speed, "restarts": state.restarts, "data_wait_s": wait},
                          schedule.steps_to_restart(state.step))
        stop.signal = ranks.agree(stop.signal)  # a signal to any rank stops them all after this same step
        if stop.signal:
            break
        if recipe.eval.every and state.step % recipe.eval.every == 0 and state.step < end:
            _eval(run, reporter)
        peaks.after_step(state.step, end)
        every = recipe.checkpoint.every
        if every and state.step % every == 0 and state.step < end:
            saved_path = checkpoint.save(run, run_dir, recipe.checkpoint.keep_last)
            saved_step = state.step
    run.loader.close()
    loop_seconds = time.perf_counter() - loop_start
    if saved_step != state.step:
        saved_path = checkpoint.save(run, run_dir, recipe.checkpoint.keep_last)
        reporter.line(f"step {state.step}: checkpoint {saved_path}")
    resume_command = command("lean-relora", "train", "--run-dir", run_dir, "--resume", "auto")
    if stop.signal:
        reporter.line(f"{stop.signal}: stopped after step {state.step} of {recipe.train.max_steps}; continue with: "
                      f"{resume_command}")
    else:
        _eval(run, reporter)
        if state.step < recipe.train.max_steps:
            reporter.line(f"step {state.step}: stopped at --max-steps {end} of {recipe.train.max_steps}; continue "
                          f"with: {resume_command}")
    (_, first), (_, last) = state.eval_losses[0], state.eval_losses[-1]
    summary = RunSummary(
        steps=state.step, restarts=state.restarts, tokens=state.tokens, train_loss=loss, first_eval_loss=first,
        last_eval_loss=last, tokens_per_s=(state.tokens - loop_tokens) / loop_seconds if state.tokens > loop_tokens
        else None, seconds=time.perf_counter() - started, run_dir=run_dir, checkpoint=saved_path,
        next_command=resume_command if state.step < recipe.train.max_steps
        else command("lean-relora", "export", run_dir, run_dir / "hf"),
        skipped_steps=state.skipped, stopped_by=stop.signal, peak_memory=tuple(peaks.summary()))
    reporter.close(summary)
    return summary


def _check_resume(recipe: Recipe, run_dir: Path, resume: str | Path | checkpoint.Checkpoint, force: bool,
                  ranks: int = 1) -> tuple[checkpoint.Checkpoint, list[str]]:
    """The checkpoint to resume from and the lines to report; CheckpointError if it is missing or damaged, or if
    the recipe changes fields that alter the run (or `ranks` differs from the checkpoint's) and `force` is off."""
    found = checkpoint.resolve(resume, run_dir)
    path = found.path
    lines = [f"skipped damaged checkpoint: {problem}" for problem in found.problems]
    if reason := resume_refusal(found.ranks, ranks, recipe):
        if not force:
            raise checkpoint.CheckpointError(f"{path}: {reason}")
        lines.append(f"resuming with {ranks} process(es) instead of the checkpoint's {found.ranks} (forced)")
    refused, allowed = found.recipe.changes(recipe)
    if refused and not force:
        raise checkpoint.CheckpointError(
            f"{path}: the recipe differs from the checkpoint's in {', '.join(refused)}; these change the run: resume "
            "with the checkpoint's recipe (omit RECIPE) or pass --force")
    if refused or allowed:
        lines.append(f"resuming with changed {', '.join(refused + allowed)}" + (" (forced)" if refused else ""))
    return found, lines


def _resume(run: Run, found: checkpoint.Checkpoint, lines: list[str], reporter: Reporter) -> int:
    """Load the checkpoint into the freshly set-up run; returns its step."""
    for line in lines:
        reporter.line(line)
    if found.past_warm_start and not relora_layers(run.model):
        start_relora(run)  # the checkpoint is past the warm start
    checkpoint.restore(run, found)
    path = found.path
    state = run.state
    state.bad_steps = 0  # a resumed run gets the full allowance of skipped steps again
    reporter.line(f"resumed from {path} at step {state.step} ({state.restarts} restarts, {state.tokens:,} tokens)")
    if state.data:
        run.data.load_state_dict(state.data)  # a stream continues from its saved position
    elif run.data.num_train_blocks is None and state.micro_batches:  # a checkpoint without one: replay the stream
        for index in reporter.track(range(state.micro_batches), "replaying the stream up to the checkpoint"):
            run.data.train_batch(index, run.recipe.train.micro_batch_size)
    return state.step


def _eval(run: Run, reporter: Reporter) -> None:
    loss = evaluate(run)
    run.state.eval_losses.append((run.state.step, loss))
    reporter.eval(run.state.step, loss, run.state.tokens)
