"""memory-estimate: the analytic model against the trace, the estimate's phases and verdict, and the CLI."""

import json

import pytest
from helpers import SMALL_RECIPES, SMALL_VOCAB, small
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D
from typer.testing import CliRunner

from lean_relora.cli.app import app
from lean_relora.memory.analytic import GIB, analytic, base_bytes, recipe_vocab_size
from lean_relora.memory.estimate import CUDA_CONTEXT_BYTES, cublas_workspace_bytes, estimate, gpu_need, refusal
from lean_relora.memory.host_ram import host_refusal
from lean_relora.memory.trace import trace
from lean_relora.model.relora import target_modules
from lean_relora.recipe import load_recipe


@pytest.mark.parametrize("name", SMALL_RECIPES)
def test_analytic_model_agrees_with_the_trace(name):
    # Within ~2% without checkpointing; with it, how the recomputed block overlaps the loss buffers is approximate.
    recipe = SMALL_RECIPES[name]
    tolerance = 0.10 if recipe.model.gradient_checkpointing else 0.05
    assert sum(analytic(recipe, SMALL_VOCAB).values()) == pytest.approx(trace(recipe, SMALL_VOCAB).peak, rel=tolerance)


def test_analytic_model_counts_frozen_embeddings_and_lm_head_as_frozen_weights():
    recipe = small(frozen_embeddings=True, accum=2)
    parts = analytic(recipe, SMALL_VOCAB)
    assert min(parts.values()) >= 0
    assert parts["frozen full-rank weights"] == 2 * SMALL_VOCAB * 128 * 4  # embedding and lm_head, fp32, no state
    assert sum(parts.values()) == pytest.approx(trace(recipe, SMALL_VOCAB).peak, rel=0.05)


def test_estimate_counts_host_memory_of_the_fp32_master_and_finds_the_largest_micro_batch():
    recipe = small(warm_start=5)
    gpu_gb = (CUDA_CONTEXT_BYTES + cublas_workspace_bytes() + 40 * 2**20) / GIB  # a few sequences of this tiny model
    result = estimate(recipe, gpu_gb)
    assert [p.name for p in result.phases] == ["ReLoRA", "full-rank warm start", "baseline: full-rank bf16 AdamW"]
    targets = 2 * (4 * 128 * 128 + 3 * 128 * 344)
    assert result.host.masters == 4 * targets
    fit = result.largest_micro_batch
    assert fit >= 1
    bigger = estimate(small(warm_start=5, micro_batch=fit + 1), gpu_gb)
    same = estimate(small(warm_start=5, micro_batch=fit), gpu_gb)
    assert same.need <= gpu_gb * GIB < bigger.need


def test_cublas_workspaces_are_sized_as_torch_sizes_them_one_per_thread_that_multiplies(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert cublas_workspace_bytes((9, 0)) == 2 * 32 * 2**20  # Hopper: ":4096:8"
    assert cublas_workspace_bytes((8, 9)) == 2 * (2 * 4096 + 8 * 16) * 1024  # a 4090: ":4096:2:16:8"
    assert cublas_workspace_bytes(None) == cublas_workspace_bytes((9, 0))  # card unknown: the larger
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # what deterministic runs set
    assert cublas_workspace_bytes((9, 0)) == 2 * 16 * 1024 * 8


def test_the_estimate_adds_the_workspaces_to_what_torch_will_count_allocated():
    # torch allocates them through its caching allocator: inside max_memory_allocated, outside the trace
    phase = estimate(small(), 24, baseline=False).phases[0]
    assert phase.workspaces == cublas_workspace_bytes()
    assert phase.allocated == phase.traced.peak + phase.workspaces
    assert phase.need == pytest.approx(gpu_need(phase.traced.peak + phase.workspaces))


def test_refusal_names_the_need_and_the_fix():
    recipe = small()
    assert refusal(recipe, free_bytes=8 * GIB) is None
    message = refusal(recipe, free_bytes=0.3 * GIB)
    assert message.startswith("the recipe needs about") and "pass --force" in message and "\n" not in message


def test_cli_prints_the_tables_and_a_verdict():
    result = CliRunner().invoke(app, ["memory-estimate", "--gpu-gb", "8"])
    assert result.exit_code == 0, result.output
    for text in ("frozen base (stored)", "logits and loss", "traced peak", "GPU need", "fp32 master", "fits: needs"):
        assert text in result.output


def test_7b_recipe_fits_an_8_gb_card_and_a_16_gb_machine_and_the_baseline_is_far_above():
    recipe = load_recipe("recipes/7b_8gb.toml")
    result = CliRunner().invoke(app, ["memory-estimate", "recipes/7b_8gb.toml", "--gpu-gb", "8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["need"] <= 7.5 * GIB  # what an 8 GB card has free, margins included in the need
    assert data["host_peak"] <= 16 * GIB and data["host"]["masters"] == 0  # the masters live on disk
    relora, baseline = data["phases"]
    assert baseline["traced"]["peak"] > 4 * relora["traced"]["peak"]
    assert recipe.train.micro_batch_size == 1 and recipe.model.gradient_checkpointing


def test_1b3_recipe_fits_a_12_gb_card_warm_start_included_and_its_relora_cycles_need_4_gib_at_most():
    result = CliRunner().invoke(app, ["memory-estimate", "recipes/1b3_12gb.toml", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["need"] <= 10 * GIB
    relora = next(p for p in data["phases"] if p["name"] == "ReLoRA")
    assert gpu_need(relora["traced"]["peak"]) <= 4 * GIB


def test_1b3_relora_peak_is_1_3_gib_below_hugging_face_s_loss_with_every_activation_on_the_gpu():
    # As the recipe ships (chunked loss, checkpointed activations in host RAM) against the same recipe as it was
    # before: every logit of a micro-batch and every block input on the GPU.
    shipped = load_recipe("recipes/1b3_12gb.toml")
    before = load_recipe("recipes/1b3_12gb.toml", ["train.loss_chunk_tokens=0", "train.offload_activations=false"])
    vocab = recipe_vocab_size(shipped)
    assert trace(before, vocab).peak - trace(shipped, vocab).peak >= 1.3 * GIB


@pytest.mark.parametrize("args,message", [
    (["--gpu-gb", "0"], "error: --gpu-gb 0: must be > 0"),
    (["--set", "data.tokenizer=some/tokenizer"], "error: model.vocab_size = 0: the size of tokenizer "
                                                 "'some/tokenizer' is unknown before loading it; set "
                                                 "model.vocab_size (e.g. --set model.vocab_size=32000)"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    result = CliRunner().invoke(app, ["memory-estimate", *args])
    assert result.exit_code == 2
    assert result.output == message + "\n"


def test_host_ram_reported_for_the_masters_is_what_they_hold():
    # Pinned masters cost up to twice their size (torch's caching host allocator rounds each block up to a power of
    # two); the masters are pageable, so the bytes they hold are the bytes memory-estimate reports.
    import torch

    from lean_relora.model.build import build_model
    from lean_relora.model.relora import relora_layers, wrap_model

    recipe = small()
    model = build_model(recipe.model, SMALL_VOCAB, recipe.data.seq_len)
    wrap_model(model, recipe.lora, keep_master=True, dtype=torch.float32)
    masters = [layer.base.master.read() for layer in relora_layers(model)]
    assert not any(m.is_pinned() for m in masters)
    held = sum(m.untyped_storage().nbytes() for m in masters)
    assert held == estimate(recipe, baseline=False).host.masters


def test_disk_masters_take_the_masters_out_of_host_ram_and_the_refusal_says_so():
    from dataclasses import replace

    from lean_relora.memory.host_ram import host_estimate, host_refusal

    ram = small()
    disk = replace(ram, relora=replace(ram.relora, master="disk"))
    in_ram, on_disk = host_estimate(ram, SMALL_VOCAB), host_estimate(disk, SMALL_VOCAB)
    largest = 344 * 128
    assert in_ram.masters == 4 * 2 * (4 * 128 * 128 + 3 * 128 * 344) and on_disk.masters == 0
    assert on_disk.merge - in_ram.merge == 2 * 4 * largest  # a disk merge maps one layer and writes a copy
    assert on_disk.peak < in_ram.peak
    assert host_refusal(ram, in_ram.peak) is None
    assert host_refusal(ram, in_ram.peak - 1).startswith(
        f"the recipe needs about {in_ram.peak / GIB:.1f} GiB of host RAM at its peak")
    assert 'set relora.master = "disk"' in host_refusal(ram, in_ram.peak - 1)


@pytest.mark.parametrize("arch,as_json", [("llama", False), ("gpt2", True), ("phi3", True)])
def test_memory_estimate_of_a_pretrained_model_reads_its_config_alone(tmp_path, arch, as_json):
    model_dir = save_tiny_model(arch, tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    shapes = [m.weight.shape[::-1] if isinstance(m, Conv1D) else m.weight.shape for _, m in target_modules(model, [])]
    (model_dir / "model.safetensors").unlink()  # the estimate has no weights to read
    args = ["memory-estimate", "recipes/7b_8gb.toml", "--set", f"model.pretrained={model_dir}"]
    result = CliRunner().invoke(app, args + (["--json"] if as_json else []))
    assert result.exit_code == 0, result.output
    if not as_json:
        for text in ("frozen base (stored)", "traced peak", "GPU need", "fits: needs"):
            assert text in result.output
        return
    relora = json.loads(result.output)["phases"][0]["components"]
    # The 7b recipe's sizes (32 layers of 4096, 32,000 tokens) give way to the model's own.
    assert relora["frozen base (stored)"] == sum(base_bytes(o * i, o, "nf4", 64, True, 2) for o, i in shapes)
    # One 1024-token chunk of the model's own vocabulary (fp32 logits and a temporary), 12 bytes per token.
    assert relora["logits and loss"] == 1024 * model.config.vocab_size * 8 + 2048 * 12


def test_trains_pre_start_check_works_for_a_pretrained_model(tmp_path):
    model_dir = save_tiny_model("qwen2", tmp_path / "model")
    (model_dir / "model.safetensors").unlink()
    recipe = load_recipe("recipes/7b_8gb.toml", [f"model.pretrained={model_dir}"])
    assert refusal(recipe, free_bytes=80 * GIB) is None
    assert refusal(recipe, free_bytes=0.1 * GIB).startswith("the recipe needs about")
    # Host RAM of the model's own sizes, not of the 7b recipe's (whose fp32 masters alone take 24 GiB)
    assert host_refusal(recipe, 2 * GIB) is None
