"""Export streamed shard by shard: the same tensors as merging the whole model and calling save_pretrained, in HF's
sharded layout, from runs with disk masters; never more host memory than the model as it trained plus a few layers."""

import json

import pytest
import torch
from helpers import invoke, train_pretrained
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from lean_relora.durable import file_sha256
from lean_relora.memory.trace import LiveBytes, model_tensors
from lean_relora.model.master import MappedMaster
from lean_relora.model.relora import ReLoRALinear
from lean_relora.tools.export import ExportError, export_model, merged_layer
from lean_relora.tools.rebuild import load_trained

NF4_DISK = ("--set", "lora.quant='nf4'", "--set", "relora.master='disk'")


def trained_run(arch, recipe, tmp_path, *overrides):
    train_pretrained(recipe, save_tiny_model(arch, tmp_path / "model"), tmp_path / "run", *NF4_DISK, *overrides)
    return tmp_path / "run"


def merged_whole(run):
    """The export as it was before streaming: every ReLoRA layer replaced by its merged dense layer, in memory."""
    model = load_trained(run).model
    for name in [n for n, m in model.named_modules() if isinstance(m, ReLoRALinear)]:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, merged_layer(model.get_submodule(name)))
    return model.float()


def exported_tensors(directory):
    index = directory / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    tensors = {}
    for file in files:
        with safe_open(directory / file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])  # gpt2: Conv1D; gpt2 and gemma: tied embeddings
def test_streamed_export_writes_what_save_pretrained_writes_of_the_merged_model(arch, recipe, tmp_path):
    run = trained_run(arch, recipe, tmp_path)
    reference = merged_whole(run)
    reference.save_pretrained(tmp_path / "whole", max_shard_size="20KB")
    export_model(run, tmp_path / "hf", "fp32", max_shard_size="20KB")

    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = list(index["weight_map"].values())
    assert len(set(shards)) > 2  # a shard over the limit holds a single tensor (GPT-2's position embedding)
    assert all((tmp_path / "hf" / s).stat().st_size < 2 * 20_000 or shards.count(s) == 1 for s in shards)
    streamed, whole = exported_tensors(tmp_path / "hf"), exported_tensors(tmp_path / "whole")
    assert streamed.keys() == whole.keys()  # tied: one name, the one save_pretrained keeps
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in streamed.values())
    for name, tensor in whole.items():
        assert torch.equal(streamed[name], tensor), name

    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    assert reloaded.config.use_cache and reloaded.dtype == torch.float32
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))

    export_model(run, tmp_path / "bf16", "bf16")  # default shard size: one file, no index
    assert not (tmp_path / "bf16" / "model.safetensors.index.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=2**-7 * float(expected.abs().max()))


def test_a_disk_master_run_exports_from_its_checkpoint_files_and_leaves_the_run_untouched(recipe, tmp_path):
    run = trained_run("llama", recipe, tmp_path)
    before = {p: p.stat().st_ino for p in (run / "master").rglob("*.f32")}
    trained = load_trained(run)
    layer = next(m for m in trained.model.modules() if isinstance(m, ReLoRALinear))
    assert isinstance(layer.base.master, MappedMaster) and trained.path in layer.base.master.path.parents
    with pytest.raises(RuntimeError, match="read-only"):
        layer.base.master.write(torch.zeros(layer.base.master.shape))
    code, output = invoke("export", run, tmp_path / "hf", "--dtype", "fp32", "--max-shard-size", "10KB")
    assert code == 0 and (tmp_path / "hf" / "model.safetensors.index.json").is_file(), output
    assert {p: p.stat().st_ino for p in (run / "master").rglob("*.f32")} == before
    name = next(n for n, m in trained.model.named_modules() if m is layer)
    expected = layer.base.master.read().clone().addmm_(layer.lora_B.float(), layer.lora_A.float(), alpha=layer.scale)
    assert torch.equal(exported_tensors(tmp_path / "hf")[f"{name}.weight"], expected)


def test_fp16_export_refuses_a_weight_out_of_range_and_leaves_nothing_behind(recipe, tmp_path):
    run = trained_run("llama", recipe, tmp_path)
    with pytest.raises(ExportError, match="max-shard-size 2XB"):
        export_model(run, tmp_path / "hf", "bf16", max_shard_size="2XB")
    checkpoint = next((run / "checkpoints").glob("step-*"))
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.norm.weight"][0] = 1e6  # a full-rank weight late in the order: shards are already written
    save_file(tensors, checkpoint / "model.safetensors")
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"]["model.safetensors"]["bytes"] = (checkpoint / "model.safetensors").stat().st_size
    meta["files"]["model.safetensors"]["sha256"] = file_sha256(checkpoint / "model.safetensors")
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="magnitude 1e[+]06 exceeds fp16's range"):
        export_model(checkpoint, tmp_path / "hf", "fp16", max_shard_size="4KB")
    assert sorted(p.name for p in tmp_path.iterdir() if "hf" in p.name) == []


def test_export_holds_the_model_as_trained_plus_a_few_layers_never_the_merged_model(recipe, tmp_path):
    # A random LLaMA of eight layers, seven targets each: a few layers are a small part of them all.
    sizes = ("hidden_size=64", "intermediate_size=128", "num_layers=8", "num_heads=4")
    code, output = invoke("train", recipe, "--run-dir", tmp_path / "run", *NF4_DISK,
                          *[arg for size in sizes for arg in ("--set", f"model.{size}")])
    assert code == 0, output
    run = tmp_path / "run"
    with LiveBytes() as live:
        model = load_trained(run).model
    loading = live.peak
    bases = [m.base for m in model.modules() if isinstance(m, ReLoRALinear)]
    kept = model_tensors(model) + [t for b in bases for t in b.held_tensors() + [b.probe.rows, b.probe.cols]]
    held = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in kept}.values())
    targets_fp32 = sum(4 * b.in_features * b.out_features for b in bases)
    largest_fp32 = max(4 * b.in_features * b.out_features for b in bases)
    del model, kept, bases
    with LiveBytes() as live:
        export_model(run, tmp_path / "hf", "bf16", max_shard_size=largest_fp32 // 2)
    # The merged model would be all targets in fp32 on top of the model (the export before streaming: +100%).
    assert loading - held < targets_fp32 / 4, (loading, held, targets_fp32)
    assert live.peak - held < targets_fp32 / 4, (live.peak, held, largest_fp32, targets_fp32)
