"""Host RAM of `lean-relora export`, measured: a pretrained LLaMA of 24 layers x 1024 features (about 0.3B weights,
random, saved as bf16 safetensors), trained two steps on the CPU through ReLoRA with the disk master (one restart),
then exported in a fresh process whose peak RSS (ru_maxrss) is compared with the model's bf16 size and with what
the export before streaming held on top of the quantized model: every merged layer in fp32.

    python bench/export_memory.py [--work-dir results/export-memory] [--max-shard-size 2GB 200MB] [--reuse-run]

The model is saved once to WORK_DIR/model; the run is trained again unless --reuse-run finds its checkpoint; each
shard size is one export, in its own process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
# The peak RSS of the command's own image: VmHWM at exit. (ru_maxrss outlives exec, so a child forked from this
# process after it built the model would report this process's RSS.)
CLI = [sys.executable, "-c", "import atexit, sys; atexit.register(lambda: sys.stdout.write(next(line for line in "
       "open('/proc/self/status') if line.startswith('VmHWM:')))); from lean_relora.cli.app import app; app()"]


def overrides(model_dir: Path) -> list[str]:
    return [f"model.pretrained='{model_dir}'", "model.dtype='bf16'", f"data.tokenizer='{model_dir}'",
            "data.seq_len=64", "train.device='cpu'", "train.autocast='none'", "train.micro_batch_size=1",
            "train.max_steps=2", "train.threads=2", "relora.warm_start_steps=0", "relora.restart_every=1",
            "relora.restart_warmup_steps=0", "relora.master='disk'", "lora.rank=8", "eval.every=0",
            "checkpoint.every=2"]


def save_model(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lean_relora.data.tokenizer import load_tokenizer
    from lean_relora.recipe import DataConfig

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache:
        tokenizer = load_tokenizer(DataConfig(source="pydoc", bpe_vocab_size=8000), Path(cache))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir, max_shard_size="1GB")
    tokenizer.save_pretrained(model_dir)


def peak_rss(command: list[str], cwd: Path = ROOT) -> int:
    """Run `command` (in `cwd`, whose lean_relora package it imports); its peak RSS in bytes."""
    process = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    if process.returncode:
        sys.exit(f"{' '.join(command[3:5])} failed ({process.returncode}):\n{process.stdout}")
    return int(process.stdout.strip().splitlines()[-1].split()[1]) * 1024  # VmHWM:  123 kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "results" / "export-memory")
    parser.add_argument("--max-shard-size", nargs="+", default=["2GB", "200MB"])
    parser.add_argument("--reuse-run", action="store_true", help="export the run of an earlier call again")
    parser.add_argument("--compare-with", type=Path, help="a checkout of an earlier lean-relora (git archive of a "
                        "commit), whose export is measured too, run from its directory")
    args = parser.parse_args()
    model_dir, run_dir, out_dir = (args.work_dir / name for name in ("model", "run", "hf"))
    if not (model_dir / "config.json").is_file():
        print(f"saving a 24 x 1024 LLaMA and its tokenizer to {model_dir} (once)", flush=True)
        save_model(model_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    train_rss = None
    if not (args.reuse_run and (run_dir / "checkpoints" / "latest").is_file()):
        shutil.rmtree(run_dir, ignore_errors=True)
        recipe = ROOT / "recipes" / "tiny_cpu.toml"
        train_rss = peak_rss([*CLI, "train", str(recipe), "--run-dir", str(run_dir),
                              *[arg for o in overrides(model_dir) for arg in ("--set", o)]])
    export_rss = {}
    for size in args.max_shard_size:
        export_rss[f"--max-shard-size {size}"] = peak_rss([*CLI, "export", str(run_dir), str(out_dir),
                                                            "--max-shard-size", size])
        shutil.rmtree(out_dir)
    if args.compare_with:
        export_rss[f"{args.compare_with} (earlier code)"] = peak_rss([*CLI, "export", str(run_dir), str(out_dir)],
                                                                      args.compare_with.resolve())
        shutil.rmtree(out_dir)

    bf16 = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    checkpoint = max((run_dir / "checkpoints").glob("step-*"))
    trained = (checkpoint / "model.safetensors").stat().st_size
    targets_fp32 = sum(p.stat().st_size for p in (checkpoint / "masters").glob("*.f32"))
    rows = [("model (bf16 safetensors)", bf16), ("trained model as stored (nf4 base, factors)", trained),
            ("merged targets in fp32 (what the old export added)", targets_fp32)]
    rows += [("peak RSS: train (2 steps, 1 restart)", train_rss)] if train_rss else []
    rows += [(f"peak RSS: export (bf16, {size})", rss) for size, rss in export_rss.items()]
    for name, value in rows:
        print(f"{name:58s} {value / GIB:7.3f} GiB")
    for size, rss in export_rss.items():
        print(f"{size}: export peak RSS / bf16 model {rss / bf16:.2f}, / (trained model + merged "
              f"fp32 targets, the old export's floor beside the process) {rss / (trained + targets_fp32):.2f}")
    (args.work_dir / "export_memory.json").write_text(json.dumps(dict(rows), indent=1))


if __name__ == "__main__":
    main()
