"""GPU acceptance: one command that shows, on a machine with one CUDA GPU, that lean-relora's CUDA path works and
what it costs, in under 10 minutes on an H100-class GPU. It prints one table per part and writes JSON:

  (a) memory: for the tiny recipe and the 350M and 1.3B recipes' shapes (random tokens, their micro-batch, gradient
      accumulation shortened to 2 micro-batches), a few steps including a restart: measured peak (torch's
      max_memory_allocated and max_memory_reserved, plus bnb's paged optimizer state, which torch does not count)
      beside memory-estimate's traced and analytic peaks, and their ratio;
  (b) throughput: tokens/s of lean-relora vs PEFT QLoRA vs full-rank bf16 + 8-bit AdamW at equal settings (same
      model, rank, targets, micro-batch, autocast; LoRA factors alone train in both LoRA variants), steps
      interleaved in one process, as ratios; on CUDA also lean-relora with its checkpointed activations in host
      RAM (train.offload_activations), which the 1.3B and 7B recipes turn on;
  (c) restarts: seconds per merge (every layer: fp32 master -> merge -> requantize) and its share of a cycle of the
      recipe (restart_every steps at the recipe's full gradient accumulation);
  (d) the `pytest -m cuda` result.

    python bench/gpu_acceptance.py                 # on the GPU
    python bench/gpu_acceptance.py --device cpu    # the same at reduced sizes on a CPU (how it is tested here)

PEFT is the peer of part (b): `pip install peft` (a missing peft is reported, not fatal).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import bitsandbytes as bnb
import torch
from rich.console import Console
from rich.table import Table

from lean_relora.memory.measure import measure, relora_run
from lean_relora.memory.estimate import GIB, analytic, recipe_vocab_size
from lean_relora.model.build import build_model
from lean_relora.recipe import Recipe, load_recipe
from lean_relora.model.relora import target_modules
from lean_relora.memory.trace import trace
from lean_relora.model.offload import offloading
from lean_relora.training.step import autocast_context

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"tiny": "tiny_cpu.toml", "350M": "350m_12gb.toml", "1.3B": "1b3_12gb.toml"}


def shape_recipe(name: str, device: str) -> Recipe:
    """A shipped recipe on `device`, accumulation shortened to 2 micro-batches (the steady state of any longer
    accumulation: all gradients held). On a CPU the large shapes shrink to 2 layers of a quarter of the width."""
    recipe = load_recipe(ROOT / "recipes" / SHAPES[name])
    m, d, t = recipe.model, recipe.data, recipe.train
    train = replace(t, device=device, grad_accum_steps=min(t.grad_accum_steps, 2), autocast="auto")
    if device == "cpu" and name != "tiny":
        m = replace(m, hidden_size=m.hidden_size // 4, intermediate_size=m.intermediate_size // 4, num_layers=2,
                    num_heads=m.num_heads // 4)
        d, train = replace(d, seq_len=128), replace(train, micro_batch_size=2)
        recipe = replace(recipe, lora=replace(recipe.lora, rank=recipe.lora.rank // 4))
    return replace(recipe, model=m, data=d, train=train)


def memory_part(device: str, console: Console) -> list[dict]:
    rows = []
    table = Table(title=f"(a) peak memory on {device}, ReLoRA phase after a restart (GiB)")
    for column in ("shape", "params", "micro-batch", "allocated", "reserved", "paged", "measured", "traced",
                   "analytic", "measured / traced"):
        table.add_column(column, justify="right")
    for name in SHAPES:
        recipe = shape_recipe(name, device)
        vocab = recipe_vocab_size(recipe)
        measured = measure(recipe, vocab, device)
        traced, predicted = trace(recipe, vocab).peak, sum(analytic(recipe, vocab).values())
        with torch.device("meta"):
            params = sum(p.numel() for p in build_model(recipe.model, vocab, recipe.data.seq_len).parameters())
        row = {"shape": name, "params": params, "micro_batch": recipe.train.micro_batch_size,
               "seq_len": recipe.data.seq_len, **asdict(measured), "measured": measured.peak, "traced": traced,
               "analytic": predicted, "ratio": measured.peak / traced, "recipe": recipe.to_dict()}
        rows.append(row)
        gib = lambda n: "-" if n is None else f"{n / GIB:.3f}"  # noqa: E731
        table.add_row(name, f"{params / 1e6:,.0f}M", f"{recipe.train.micro_batch_size} x {recipe.data.seq_len}",
                      gib(measured.peak_allocated), gib(measured.peak_reserved), gib(measured.paged_bytes),
                      gib(measured.peak), gib(traced), gib(predicted), f"{measured.peak / traced:.3f}")
        if device == "cuda":
            torch.cuda.empty_cache()
    console.print(table)
    return rows


def restart_part(rows: list[dict], console: Console) -> list[dict]:
    table = Table(title="(c) restart cost: merge of every layer vs the recipe's cycle")
    for column in ("shape", "merge s", "step s (full accumulation)", "cycle steps", "share of cycle"):
        table.add_column(column, justify="right")
    out = []
    for row in rows:
        recipe = row["recipe"]
        accum_measured, accum_recipe = row["tokens_per_step"] // (row["micro_batch"] * row["seq_len"]), \
            load_recipe(ROOT / "recipes" / SHAPES[row["shape"]]).train.grad_accum_steps
        step = row["step_seconds"] / accum_measured * accum_recipe
        cycle = recipe["relora"]["restart_every"] * step
        out.append({"shape": row["shape"], "merge_seconds": row["merge_seconds"], "step_seconds": step,
                    "share_of_cycle": row["merge_seconds"] / cycle})
        table.add_row(row["shape"], f"{row['merge_seconds']:.3f}", f"{step:.3f}",
                      f"{recipe['relora']['restart_every']:,}", f"{100 * row['merge_seconds'] / cycle:.4f}%")
    console.print(table)
    return out


def peft_qlora(recipe: Recipe, vocab: int, device: str):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as directory:
        build_model(replace(recipe.model, gradient_checkpointing=False), vocab, recipe.data.seq_len) \
            .save_pretrained(directory)
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recipe.lora.quant,
                                          bnb_4bit_use_double_quant=recipe.lora.double_quant,
                                          bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                     dtype=compute, device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.model.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    # The very layers ReLoRA wraps (lora.targets = [] selects every block projection), by their leaf names.
    leaves = sorted({name.rsplit(".", 1)[-1] for name, _ in target_modules(model, recipe.lora.targets)})
    lora = PeftLoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, target_modules=leaves)
    return get_peft_model(model, lora)


def eight_bit_adamw(model, device: str, lr: float):
    cls = bnb.optim.PagedAdamW8bit if device == "cuda" else bnb.optim.AdamW8bit
    return cls([p for p in model.parameters() if p.requires_grad], lr=lr)


def timed_step(model, optimizer, ids, recipe: Recipe, device: str, offload: bool = False) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast_context(recipe, torch.device(device)), offloading(offload):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput_part(shape: str, device: str, rounds: int, console: Console) -> dict:
    recipe = shape_recipe(shape, device)
    recipe = replace(recipe, lora=replace(recipe.lora, train_embeddings=False, train_norms=False,
                                          train_lm_head=False))  # PEFT QLoRA trains the LoRA factors alone
    vocab = recipe_vocab_size(recipe)
    variants = {"lean-relora": relora_run(recipe, vocab, torch.device(device))}
    variants["lean-relora"] = (variants["lean-relora"].model, variants["lean-relora"].optimizer)
    if device == "cuda" and recipe.model.gradient_checkpointing:  # what train.offload_activations costs in time
        variants["lean-relora, activations offloaded"] = (*variants["lean-relora"], True)
    try:
        model = peft_qlora(recipe, vocab, device)
        variants["PEFT QLoRA"] = (model, eight_bit_adamw(model, device, recipe.optim.lr))
    except ImportError:
        console.print("PEFT QLoRA: skipped, peft is not installed (pip install peft)")
    torch.manual_seed(0)
    dense = build_model(recipe.model, vocab, recipe.data.seq_len).to(device)
    variants["full-rank bf16 + 8-bit AdamW" if recipe.model.dtype == "bf16" else "full-rank + 8-bit AdamW"] = (
        dense, eight_bit_adamw(dense, device, recipe.optim.lr))
    ids = torch.randint(0, vocab, (recipe.train.micro_batch_size, recipe.data.seq_len), device=device)
    times = {name: [] for name in variants}
    for model, optimizer, *_ in variants.values():  # warm up kernels and the allocator
        for _ in range(2):
            timed_step(model, optimizer, ids, recipe, device)
    names = list(variants)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # no variant always goes first
            model, optimizer, *offload = variants[name]
            times[name].append(timed_step(model, optimizer, ids, recipe, device, *offload))
    tokens = ids.numel()
    speed = {name: tokens / statistics.median(t) for name, t in times.items()}
    peer = speed.get("PEFT QLoRA")
    table = Table(title=f"(b) tokens/s, {shape} shape on {device}: micro-batch {recipe.train.micro_batch_size} x "
                        f"{recipe.data.seq_len}, rank {recipe.lora.rank}, median of {rounds} interleaved steps")
    for column in ("variant", "tokens/s", "vs PEFT QLoRA", "trainable params"):
        table.add_column(column, justify="right")
    out = {}
    for name, (model, *_) in variants.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ratio = speed[name] / peer if peer else None
        out[name] = {"tokens_per_s": speed[name], "ratio_to_peft": ratio, "trainable": trainable}
        table.add_row(name, f"{speed[name]:,.0f}", "-" if ratio is None else f"{ratio:.2f}x", f"{trainable:,}")
    console.print(table)
    del variants
    return {"shape": shape, "rounds": rounds, "variants": out}


def cuda_tests(console: Console) -> dict:
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                             "tests/test_cuda.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = result.stdout.strip().splitlines()
    summary = lines[-1] if lines else result.stderr.strip()[-300:]
    console.print(f"(d) pytest -m cuda: {summary} (exit code {result.returncode})")
    return {"summary": summary, "returncode": result.returncode, "output": result.stdout[-20000:]}


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "bitsandbytes": bnb.__version__, "device": device, "threads": torch.get_num_threads()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def quiet_libraries() -> None:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional CPU kernel package we do not need
    hf_logging.disable_progress_bar()  # the peer's save/load bars of a model built a second ago
    # peft (the peer of part b, not our code) calls transformers' deprecated is_gradient_checkpointing
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timed steps per variant in part (b)")
    parser.add_argument("--throughput-shape", choices=list(SHAPES), default=None,
                        help="shape of part (b) [default: 350M on cuda, tiny on cpu]")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_acceptance.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device is visible; run with --device cpu for the reduced CPU version")
    console = Console(width=160)
    started = time.perf_counter()
    env = environment(args.device)
    console.print(" ".join(f"{k} {v}" for k, v in env.items()))
    rows = memory_part(args.device, console)
    report = {"environment": env, "memory": rows}
    report["throughput"] = throughput_part(args.throughput_shape or ("350M" if args.device == "cuda" else "tiny"),
                                           args.device, args.rounds, console)
    report["restarts"] = restart_part(rows, console)
    report["cuda_tests"] = cuda_tests(console)
    report["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    console.print(f"{report['seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
