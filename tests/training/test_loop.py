"""The loop: 20-step ReLoRA runs of a tiny LLaMA learn, across restarts, for each base format."""

import io
import json
import logging
import shutil

import datasets
import pytest
import torch
from helpers import records, run_dir, tiny_recipe
from rich.console import Console

from lean_relora.model import loss
from lean_relora.model.relora import relora_layers
from lean_relora.recipe import (
    CheckpointConfig,
    DataConfig,
)
from lean_relora.training import checkpoint
from lean_relora.training.loop import setup, train
from lean_relora.training.progress import Reporter
from lean_relora.training.step import evaluate, train_step


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_twenty_steps_with_two_restarts_reduce_the_loss(tmp_path, tokenizer_cache, quant):
    directory = run_dir(tmp_path, tokenizer_cache)
    summary = train(tiny_recipe(quant), directory)
    assert summary.restarts == 2 and summary.steps == 20
    assert summary.last_eval_loss < summary.first_eval_loss - 0.5
    steps = [r for r in records(directory / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert [r["restarts"] for r in steps if r["step"] in (7, 8, 14, 15)] == [0, 1, 1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert sum(r["loss"] for r in steps[-5:]) < sum(r["loss"] for r in steps[:5])


def test_warm_start_trains_full_rank_then_switches_to_relora(tmp_path, tokenizer_cache):
    directory = run_dir(tmp_path, tokenizer_cache)
    recipe = tiny_recipe(steps=12, warm_start=5, restart_every=4)
    summary = train(recipe, directory)
    assert summary.restarts == 1  # LoRA starts at step 5, merges at step 9
    assert summary.last_eval_loss < summary.first_eval_loss


def test_warm_start_phase_is_dense_and_every_weight_trains(tmp_path, tokenizer_cache):
    run = setup(tiny_recipe(warm_start=5), run_dir(tmp_path, tokenizer_cache))
    assert relora_layers(run.model) == []
    assert all(p.requires_grad for p in run.model.parameters())
    before = run.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    train_step(run)
    assert not torch.equal(before, run.model.model.layers[0].self_attn.q_proj.weight)


def test_the_warm_starts_optimizer_never_pages_and_relora_s_does(tmp_path, tokenizer_cache, monkeypatch):
    # bnb keeps every paged buffer to the end of the process: the dropped full-rank state must not be paged
    import lean_relora.training.loop as train_module

    asked = []
    build = train_module.build_optimizer
    monkeypatch.setattr(train_module, "build_optimizer",
                        lambda *a, **kw: asked.append(kw.get("paged", True)) or build(*a, **kw))
    train(tiny_recipe(steps=7, warm_start=5, restart_every=4), run_dir(tmp_path, tokenizer_cache))
    assert asked == [False, True]


def test_the_loop_trains_and_evaluates_through_the_chunked_loss_as_through_hugging_faces(tmp_path, tokenizer_cache,
                                                                                         monkeypatch):
    """train.loss_chunk_tokens = 40 splits each micro-batch's 256 tokens into 7 chunks: the losses, the updates of
    every trainable weight (lm_head's and the embedding's included) and the eval loss equal those of HF's loss."""
    directory = run_dir(tmp_path, tokenizer_cache)
    chunked_calls = []
    original = loss.linear_cross_entropy
    monkeypatch.setattr(loss, "linear_cross_entropy", lambda *args: chunked_calls.append(args[3]) or original(*args))
    runs = [setup(tiny_recipe(quant="none", loss_chunk_tokens=chunk), directory) for chunk in (0, 40)]
    losses, evals = [], []
    for run in runs:
        losses.append([train_step(run) for _ in range(3)])
        evals.append(evaluate(run))
    assert chunked_calls == [40] * (3 + 4)  # 3 steps and 4 eval batches of the second run, none of the first's
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(runs[0].model.named_parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert evals[0] == pytest.approx(evals[1], rel=1e-5)


def test_warm_start_as_long_as_the_run_is_a_full_rank_baseline(tmp_path, tokenizer_cache):
    directory = run_dir(tmp_path, tokenizer_cache)
    summary = train(tiny_recipe(steps=8, warm_start=8, restart_every=3), directory)
    assert summary.restarts == 0 and summary.steps == 8
    assert summary.last_eval_loss < summary.first_eval_loss
    final, _ = checkpoint.find_latest(directory)
    assert checkpoint.read_state(final)["relora"] is False  # never wrapped: every weight trained dense


def test_max_steps_stops_without_changing_the_schedule_and_resume_equals_the_uninterrupted_run(tmp_path,
                                                                                               tokenizer_cache):
    # --max-steps means "stop here": stopping inside the warm start and again mid-cycle, then resuming to the end,
    # gives the very losses and learning rates of a run that was never stopped.
    recipe = tiny_recipe(steps=20, warm_start=5, restart_every=7)
    (tmp_path / "whole").mkdir(), (tmp_path / "pieces").mkdir()
    whole = run_dir(tmp_path / "whole", tokenizer_cache)
    train(recipe, whole)
    pieces = run_dir(tmp_path / "pieces", tokenizer_cache)
    first = train(recipe, pieces, stop_at=3)
    assert first.steps == 3 and (pieces / "checkpoints" / "step-00000003").is_dir()
    train(recipe, pieces, resume="auto", stop_at=12)
    train(recipe, pieces, resume="auto")
    steps = lambda d: [(r["step"], r["loss"], r["lr"]) for r in records(d / "metrics.jsonl") if "loss" in r]
    assert steps(pieces) == steps(whole)


def test_a_streamed_run_resumes_from_the_streams_saved_position_to_the_same_losses(tmp_path, monkeypatch):
    """A local jsonl read in streaming mode stands in for the hub; the resumed run continues from the stream state in
    the checkpoint (no replay) and computes the uninterrupted run's losses."""
    docs = [f"document {i}: " + " ".join(f"w{(i * j) % 17}" for j in range(i % 23 + 3)) for i in range(400)]
    path = tmp_path / "stream.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: real("json", data_files=str(path), split="train", streaming=True))
    recipe = tiny_recipe(steps=6, restart_every=4, grad_accum_steps=4)
    recipe.data = DataConfig(source="hub:someone/stub", bpe_vocab_size=300, seq_len=32, eval_documents=20)
    recipe.checkpoint = CheckpointConfig(every=3, keep_last=3)
    train(recipe, tmp_path / "whole")
    saved = checkpoint.read_state(tmp_path / "whole" / "checkpoints" / "step-00000003")["train_state"]["data"]
    assert saved["index"] == 12 and saved["stream"] is not None  # the stream's own state_dict, past its start
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed", ignore=shutil.ignore_patterns("step-00000006"))
    console = Console(file=io.StringIO(), width=200)
    reporter = Reporter(tmp_path / "resumed" / "metrics.jsonl", 6, console=console, live=False)
    train(recipe, tmp_path / "resumed", reporter=reporter, resume="auto")
    output = console.file.getvalue()
    assert "resumed from" in output and "replaying" not in output
    steps = [(r["step"], r["loss"]) for r in records(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r]
    assert steps == [(r["step"], r["loss"]) for r in records(tmp_path / "whole" / "metrics.jsonl") if "loss" in r]


def test_a_run_with_document_mask_trains_and_differs_from_the_crossing_run(tmp_path, tokenizer_cache):
    crossing = train(tiny_recipe(steps=6), run_dir(tmp_path / "crossing", tokenizer_cache))
    recipe = tiny_recipe(steps=6)
    recipe.data.document_mask = True
    masked = train(recipe, run_dir(tmp_path / "masked", tokenizer_cache))
    assert masked.last_eval_loss < masked.first_eval_loss
    assert masked.first_eval_loss != crossing.first_eval_loss  # the positions reached the model


def test_a_cpu_run_of_paged_adamw8bit_logs_nothing_and_warns_nothing(tmp_path, tokenizer_cache, caplog, recwarn):
    """The default recipe names paged_adamw8bit and runs on CPUs too: ordinary 8-bit state there is not news."""
    recipe = tiny_recipe(steps=2)
    recipe.optim.name, recipe.model.gradient_checkpointing = "paged_adamw8bit", True
    with caplog.at_level(logging.INFO):
        run = setup(recipe, run_dir(tmp_path, tokenizer_cache))
        train_step(run)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("lean_relora")]
    assert not [m for m in ours if "paged" in m]  # (the target selection is reported: issue 12 asks for it)
    assert [str(w.message) for w in recwarn if issubclass(w.category, (FutureWarning, UserWarning))] == []
