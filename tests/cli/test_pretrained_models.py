"""Bring your own model, end to end through the CLI: tiny Llama, Qwen2, Mistral, Gemma, Phi-3 and GPT-2 models saved
by transformers train through ReLoRA layers, export and reload; a run directory needs nothing outside itself; a
wrong model path or an unreachable hub fails fast with one line."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import TIMED_CLI, invoke, train_pretrained
from tiny_models import CONFIGS, save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from lean_relora.model.relora import ReLoRALinear, target_modules
from lean_relora.tools.export import load_trained


@pytest.mark.parametrize("arch", CONFIGS)
def test_every_block_weight_trains_through_its_relora_layer_and_the_export_reloads(arch, recipe, tmp_path):
    model_dir = save_tiny_model(arch, tmp_path / "model")
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    projections = dict(target_modules(original, []))
    output = train_pretrained(recipe, model_dir, tmp_path / "run")
    assert "step 2: restart 1" in output and f"ReLoRA layers: {len(projections)} (all block projections" in output

    trained = load_trained(tmp_path / "run").model
    modules = dict(trained.named_modules())
    for name, before in projections.items():
        layer = modules[name]
        assert isinstance(layer, ReLoRALinear) and layer.transposed == isinstance(before, Conv1D), name
        weight = before.weight.t() if layer.transposed else before.weight
        assert not torch.equal(layer.base.weight, weight), f"{name}: the restart merged nothing into it"
    norms = [n for n, m in original.named_modules() if "norm" in type(m).__name__.lower()]
    assert norms and all(not torch.equal(modules[n].weight, original.get_submodule(n).weight) for n in norms)

    code, output = invoke("export", tmp_path / "run", tmp_path / "hf")
    assert code == 0, output
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(reloaded) is type(original) and reloaded.dtype == torch.float32
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf")("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, reloaded(input_ids=ids).logits
    # The export is bf16: each weight rounded to 8 significant bits.
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=2**-7 * float(expected.abs().max()))


@pytest.mark.parametrize("arch,targets,says", [
    ("phi3", "['o_proj', 'down_proj']", "leaves 67% of the decoder blocks' weight matrices frozen"),
    ("gpt2", "['c_attn', 'c_proj', 'c_fc']", "ReLoRA layers: 8 (lora.targets = ['c_attn', 'c_proj', 'c_fc']"),
])
def test_named_targets_say_what_they_select_and_warn_about_what_they_leave_frozen(recipe, tmp_path, arch, targets,
                                                                                    says):
    model_dir = save_tiny_model(arch, tmp_path / "model")
    output = train_pretrained(recipe, model_dir, tmp_path / "run", "--max-steps", 1, "--set", f"lora.targets={targets}")
    assert says in " ".join(output.split())
    assert ("WARNING" in output) == (arch == "phi3")


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


# Without a warm start model/streamed.py streams the model from its directory; with one, from_pretrained loads it dense.
@pytest.mark.parametrize("warm_start", [0, 1])
def test_a_moved_model_directory_does_not_stop_eval_export_or_resume(recipe, tmp_path, warm_start):
    model_dir = save_tiny_model("gpt2", tmp_path / "model")
    warm = ["--set", f"relora.warm_start_steps={warm_start}"]
    train_pretrained(recipe, model_dir, tmp_path / "whole", *warm)
    for run in (tmp_path / "stays", tmp_path / "moves"):
        train_pretrained(recipe, model_dir, run, "--max-steps", 2, *warm)
    copied = tmp_path / "moves" / "tokenizer" / "tokenizer.json"
    assert copied.read_text() == (model_dir / "tokenizer.json").read_text()
    code, output = invoke("train", "--run-dir", tmp_path / "stays", "--resume", "auto")  # reads the model dir again
    assert code == 0, output
    shutil.move(model_dir, tmp_path / "elsewhere")

    run = tmp_path / "moves"
    code, output = invoke("eval", run)
    assert code == 0 and "eval loss" in output, output
    code, output = invoke("export", run, tmp_path / "hf")
    assert code == 0, output
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").get_vocab() == AutoTokenizer.from_pretrained(
        tmp_path / "elsewhere").get_vocab()
    code, output = invoke("train", "--run-dir", run, "--resume", "auto")
    assert code == 0, output
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'} at step 2" in " ".join(output.split())
    # Either way the resumed run computes the very losses of the uninterrupted one.
    assert losses(tmp_path / "stays") == losses(run) == losses(tmp_path / "whole")
    assert [step for step, _ in losses(run)] == [1, 2, 3, 4]


def test_a_trained_bpe_with_a_pretrained_model_is_refused_with_one_line(recipe, tmp_path):
    model_dir = save_tiny_model("llama", tmp_path / "model")
    code, output = invoke("train", recipe, "--run-dir", tmp_path / "run", "--set", f"model.pretrained='{model_dir}'",
                          "--set", "data.tokenizer='bpe'")
    assert code == 2
    assert output == ("error: --set data.tokenizer='bpe': data.tokenizer = 'bpe': a BPE trained on the corpus does "
                      "not match the vocabulary model.pretrained was trained on; set data.tokenizer = \"\" for the "
                      "model's own tokenizer, or name another\n")


CASES = {"missing local path": "no such local directory; give an existing directory or a hub name",
         "offline hub name": "not a local directory, and as a hub name it is not in the local hub cache while the "
                             "machine is offline (HF_HUB_OFFLINE=1); download it where the hub is reachable (hf "
                             "download some-org/some-model) or give a local directory",
         "unreachable hub name": "not a local directory, and as a hub name the hub (http://127.0.0.1:9) is "
                                 "unreachable (ConnectError) and it is not in the local cache; check the network"}


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "hub unreachable"])
def test_without_the_hub_a_cached_model_is_used_and_a_missing_one_fails_fast_with_one_line(tmp_path, recipe, offline):
    # The local hub cache holds org/cached as a download of its config would have left it.
    cached = tmp_path / "hf_home" / "hub" / "models--org--cached"
    save_tiny_model("llama", cached / "snapshots" / ("0" * 40))
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_OFFLINE": "1" if offline else "0"}
    cases = ["missing local path", "offline hub name"] if offline else ["unreachable hub name"]
    names = {case: str(tmp_path / "no_such_model") if case == "missing local path" else "some-org/some-model"
             for case in cases}
    runs = [(case, command) for case in cases for command in ("train", "memory-estimate")]
    argvs = [[command, str(recipe), "--set", f"model.pretrained='{names[case]}'"]
             + (["--run-dir", str(tmp_path / "run")] if command == "train" else []) for case, command in runs]
    argvs.append(["memory-estimate", str(recipe), "--set", "model.pretrained='org/cached'", "--json"])
    result = subprocess.run([sys.executable, "-c", TIMED_CLI, json.dumps(argvs)], capture_output=True, text=True,
                            env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    *failed, from_cache = json.loads(result.stdout)
    for (case, command), run in zip(runs, failed):
        lines = run["stderr"].strip().splitlines()  # train's memory check before the start finds it first
        assert run["code"] == 2 and len(lines) == 1, (case, command, lines)
        assert lines[0].startswith(f"error: model.pretrained = '{names[case]}': {CASES[case]}"), (case, lines)
        assert run["seconds"] < 5.0, (case, command, run["seconds"])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert from_cache["code"] == 0, from_cache["stderr"]
    assert json.loads(from_cache["stdout"])["phases"][0]["components"]["frozen base (stored)"] > 0
