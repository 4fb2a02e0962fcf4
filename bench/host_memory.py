"""Host RAM, measured: a pretrained LLaMA of the 1.3B recipe's shape, saved locally, trained on the CPU with the disk
master by the 16 GB machine's recipe (recipes/7b_8gb.toml: setup streams it tensor by tensor, a few steps, two
restarts); peak RSS against the model's bf16 size and against memory-estimate's host-RAM prediction for the same
recipe.

    python bench/host_memory.py [--model-dir results/llama-1b3] [--steps 3]

The model (random weights, 2.6 GB of bf16 safetensors) and a BPE tokenizer trained on the pydoc corpus are written
once to --model-dir; the measured run is a fresh process, so its peak RSS (VmHWM) is the run's alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
# The 16 GB machine's recipe (disk master, rank 64, lm_head frozen), with the 1.3B-shaped model as model.pretrained:
# its sizes replace the recipe's 7B ones.
RECIPE = ROOT / "recipes" / "7b_8gb.toml"


def overrides(model_dir: Path, steps: int) -> list[str]:
    return [f"model.pretrained='{model_dir}'", "data.source='pydoc'", f"data.tokenizer='{model_dir}'",
            "data.seq_len=64", "train.device='cpu'", "train.autocast='none'", "train.micro_batch_size=1",
            "train.grad_accum_steps=1", f"train.max_steps={steps}", "relora.warm_start_steps=0",
            "relora.restart_every=1", "relora.restart_warmup_steps=0", "relora.master='disk'",
            "model.gradient_checkpointing=true", "eval.batches=1"]


def save_model(model_dir: Path) -> None:
    import torch

    from lean_relora.data.tokenizer import load_tokenizer
    from lean_relora.model.build import build_model
    from lean_relora.recipe import DataConfig, load_recipe

    recipe = load_recipe(ROOT / "recipes" / "1b3_12gb.toml")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache:
        tokenizer = load_tokenizer(DataConfig(source="pydoc", bpe_vocab_size=8000), Path(cache))
        model = build_model(recipe.model, recipe.model.vocab_size, 64, tokenizer.eos_token_id)
        model.save_pretrained(model_dir, max_shard_size="1GB")
        tokenizer.save_pretrained(model_dir)


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{key}:"))


def current_rss() -> int:
    return status_kib("VmRSS") * 1024


class PhasePeaks:
    """The highest RSS seen in each phase, sampled every 10 ms by a thread (VmHWM only knows the run's peak)."""

    def __init__(self):
        import threading

        self.phase, self.peaks, self.running = "setup", {}, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), current_rss())
            time.sleep(0.01)

    def stop(self) -> dict:
        self.running = False
        self.thread.join()
        return self.peaks


def measured_run(model_dir: Path, steps: int) -> dict:
    """In this (fresh) process: setup, then `steps` steps with a restart before each after the first."""
    import torch
    from process_memory import beyond_tensors

    from lean_relora.recipe import load_recipe
    from lean_relora.training.loop import setup
    from lean_relora.training.restart import restart
    from lean_relora.training.step import train_step

    torch.set_num_threads(2)
    recipe = load_recipe(RECIPE, overrides(model_dir, steps))
    # VmHWM, the peak RSS of this process's own memory map: ru_maxrss would also count the parent's RSS when this
    # process was forked from it (Linux carries it over exec), e.g. right after the parent saved the model.
    rss = lambda: status_kib("VmHWM") * 1024  # noqa: E731
    marks = {"imports": rss()}
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        sampler = PhasePeaks()
        run = setup(recipe, Path(run_dir))
        marks["setup"], marks["setup seconds"] = rss(), time.perf_counter() - start
        merges, marks["current RSS"] = [], [("setup", current_rss())]
        for step in range(steps):
            if step:
                sampler.phase = f"restart {step}"
                merges.append(restart(run)["merge_seconds"])
                marks["current RSS"].append((f"restart {step}", current_rss()))
            sampler.phase = f"step {step + 1}"
            train_step(run)
            marks["current RSS"].append((f"step {step + 1}", current_rss()))
        marks["training and restarts"], marks["merge seconds"] = rss(), merges
        marks["at rest: RSS, live tensors, the process beyond them"] = beyond_tensors()
        marks["peak RSS by phase"] = list(sampler.stop().items())
        marks["step seconds"] = (time.perf_counter() - start - marks["setup seconds"] - sum(merges)) / steps
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "results" / "llama-1b3")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps; a restart before each but the first")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "host_memory.json")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measured_run(args.model_dir, args.steps)))
        return
    if not (args.model_dir / "config.json").is_file():
        print(f"saving a 1.3B-shaped LLaMA and its tokenizer to {args.model_dir} (once)", flush=True)
        save_model(args.model_dir)
    from lean_relora.memory.analytic import with_model_sizes
    from lean_relora.memory.host_ram import host_estimate
    from lean_relora.recipe import load_recipe

    recipe = load_recipe(RECIPE, overrides(args.model_dir, args.steps))
    recipe = with_model_sizes(recipe)  # the saved model's sizes, as memory-estimate takes them
    predicted = host_estimate(recipe, recipe.model.vocab_size)
    child = subprocess.run([sys.executable, __file__, "--measure", "--model-dir", str(args.model_dir),
                            "--steps", str(args.steps)], capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"the measured run failed:\n{child.stderr[-3000:]}")
    marks = json.loads(child.stdout.strip().splitlines()[-1])
    bf16 = sum(f.stat().st_size for f in args.model_dir.glob("*.safetensors"))
    peak = marks["training and restarts"]
    rows = [("model files (bf16 safetensors)", bf16), ("measured peak RSS after imports", marks["imports"]),
            ("measured peak RSS after setup (streamed load)", marks["setup"]),
            ("measured peak RSS, whole run", peak), ("memory-estimate host peak", predicted.peak)]
    rows += [(f"  sampled peak: {phase}", value) for phase, value in marks["peak RSS by phase"]]
    at_rest, tensors, beyond = marks["at rest: RSS, live tensors, the process beyond them"]
    rows += [("at rest after the last step: RSS", at_rest), ("  live tensors", tensors),
             ("  the process beyond them", beyond), ("  memory-estimate's process row", predicted.process)]
    for name, value in rows:
        print(f"{name:48s} {value / GIB:8.3f} GiB")
    print(f"measured / estimated {peak / predicted.peak:.3f}; measured / bf16 model {peak / bf16:.3f}; "
          f"setup {marks['setup seconds']:.0f} s, {marks['step seconds']:.1f} s per step, merges "
          f"{', '.join(f'{s:.1f}' for s in marks['merge seconds'])} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"marks": marks, "bf16_bytes": bf16, "estimate": predicted.rows(),
                                    "ratio": peak / predicted.peak}, indent=1))


if __name__ == "__main__":
    main()
