"""Step throughput: lean-relora vs PEFT QLoRA (LoRA on a bitsandbytes 4-bit model) vs full-rank training with 8-bit
AdamW, same model, rank, quantization and batch, steps interleaved in one process so that all three see the same
machine state; plus the restart merge cost per layer, extrapolated to the 1.3B recipe.

    .venv/bin/pip install peft   # the peer, for this benchmark only
    .venv/bin/python bench/throughput.py [--rounds 20] [--hidden 256] [--layers 4] [--rank 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
from rich.console import Console
from rich.table import Table

from lean_relora.model.build import build_model
from lean_relora.model.frozen_base import FrozenBase
from lean_relora.model.relora import ReLoRALinear, set_trainable, wrap_model
from lean_relora.recipe import LoraConfig, ModelConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lean_relora(cfg: ModelConfig, vocab: int, rank: int):
    model = build_model(cfg, vocab, 128)
    lora = LoraConfig(rank=rank, alpha=rank, quant="nf4", train_embeddings=False, train_norms=False,
                      train_lm_head=False)  # PEFT QLoRA trains the LoRA factors only: compare like with like
    wrap_model(model, lora, keep_master=False, dtype=torch.float32)
    set_trainable(model, lora)
    return model


def peft_qlora(cfg: ModelConfig, vocab: int, rank: int):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as directory:
        build_model(cfg, vocab, 128).save_pretrained(directory)
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, dtype=torch.float32,
                                                     device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, PeftLoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))


def full_rank(cfg: ModelConfig, vocab: int, rank: int):
    return build_model(cfg, vocab, 128)


def timed_step(model, optimizer, ids) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def merge_seconds(shape: tuple[int, int], rank: int, repeats: int = 3) -> float:
    """Seconds to merge one layer of this shape (nf4 base, fp32 master) on this machine."""
    layer = ReLoRALinear(FrozenBase(torch.randn(shape) * 0.02, None, "nf4", keep_master=True, dtype=torch.float32),
                         rank, rank, dtype=torch.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        layer.merge_and_reinit()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="measured steps per variant")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens per step")
    parser.add_argument("--out", type=Path, default=Path("results/throughput.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875) // 8 * 8,
                      num_layers=args.layers, num_heads=max(1, args.hidden // 64), dtype="fp32")
    vocab, tokens = 4096, args.batch * 128
    variants = {}
    for name, make in (("lean-relora (nf4 + LoRA)", lean_relora), ("PEFT QLoRA (nf4 + LoRA)", peft_qlora),
                       ("full-rank, 8-bit AdamW", full_rank)):
        torch.manual_seed(0)
        model = make(cfg, vocab, args.rank)
        optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        variants[name] = (model, optimizer, [])
    ids = torch.randint(0, vocab, (args.batch, 128))
    for model, optimizer, _ in variants.values():  # warm up allocator and kernels
        for _ in range(3):
            timed_step(model, optimizer, ids)
    names = list(variants)
    for round_ in range(args.rounds):
        for name in names[round_ % 3:] + names[: round_ % 3]:  # rotate the order: no variant always goes first
            model, optimizer, times = variants[name]
            times.append(timed_step(model, optimizer, ids))

    peer = tokens / statistics.median(variants["PEFT QLoRA (nf4 + LoRA)"][2])
    table = Table(title=f"tokens/s on {torch.get_num_threads()} CPU threads: hidden {args.hidden}, "
                        f"{args.layers} layers, "
                        f"rank {args.rank}, batch {args.batch} x 128, median of {args.rounds} interleaved steps")
    for column in ("variant", "tokens/s", "vs PEFT QLoRA", "trainable params"):
        table.add_column(column, justify="right")
    results = {}
    for name, (model, _, times) in variants.items():
        speed = tokens / statistics.median(times)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        results[name] = {"tokens_per_s": speed, "ratio_to_peft": speed / peer, "trainable": trainable}
        table.add_row(name, f"{speed:,.0f}", f"{speed / peer:.2f}x", f"{trainable:,}")
    console = Console(width=150)
    console.print(table)

    # Restart cost at the 1.3B recipe: 24 layers of 4 (2048 x 2048) + 3 (2048 x 5461) matrices, one merge per cycle.
    square, wide = merge_seconds((2048, 2048), 128), merge_seconds((5461, 2048), 128)
    per_restart = 24 * (4 * square + 3 * wide)
    # A cycle is 5,000 steps of 1,152 x 512 tokens; even at a fast 50,000 tokens/s a step takes 11.8 s.
    cycle_seconds = 5000 * 1152 * 512 / 50_000
    merge = {"seconds_2048x2048": square, "seconds_5461x2048": wide, "seconds_per_restart_1b3": per_restart,
             "cycle_seconds_at_50k_tokens_per_s": cycle_seconds, "share_of_cycle": per_restart / cycle_seconds}
    console.print(f"merge (nf4, fp32 master, this CPU): {square:.3f} s per 2048x2048 layer, "
                  f"{wide:.3f} s per 5461x2048; "
                  f"{per_restart:.1f} s per 1.3B restart = {100 * per_restart / cycle_seconds:.4f}% of a 5,000-step "
                  f"cycle at 50k tokens/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"throughput": results, "merge": merge}, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
