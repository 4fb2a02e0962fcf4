"""Learning per token beside the peers: lean-relora's cycle modes, full-rank AdamW (32-bit and 8-bit), GaLore
(galore-torch), APOLLO (apollo-torch) and PEFT LoRA/QLoRA, on the same model (the tiny_cpu recipe's 5M LLaMA, the
same seed), the same micro-batches in the same order, the same learning rate, warmup and cosine, and the same
gradient clipping; every method is scored by one function (training.step.eval_loss) on the same held-out blocks.

    PYTHONPATH=.:/tmp/peers-site .venv/bin/python bench/peers.py [--corpus pydoc|vim|PATH] [--seed 0]
        [--steps 300] [--only METHOD ...] [--out results/peers]
    .venv/bin/python bench/peers.py --table          # the markdown table of every result under --out

The peers are optional: `pip install --no-deps --target /tmp/peers-site galore-torch apollo-torch peft accelerate`
(with --no-deps, so that none of them pulls another torch); a missing one is reported and its rows skipped.

Per method: final eval loss, tokens trained (a gradient init's passes included), tokens/s of the training loop, and
the bytes of trainable weights + their gradients + optimizer state (galore's and apollo's projection matrices
counted as state; lean-relora's sketches, held only during a switch, apart), and of the frozen weights.

lean-relora's modes run through the product's own `train`; the peers through a loop here that takes the same
micro-batches (run.loader), the same loss (micro_batch_loss), the same schedule without restarts (JaggedCosine with
warm_start_steps = max_steps: the global warmup and cosine) and the same gradient clipping.

GaLore and APOLLO project every nn.Linear of the decoder blocks (lean-relora's targets) at rank lora.rank, switching
subspace every relora.restart_every steps (GaLore's update_proj_gap) with scale = lora.alpha / lora.rank (1 in the
tiny recipe); embeddings, norms and lm_head train with the same optimizer unprojected, as in lean-relora. PEFT's LoRA
factors sit on the same targets (r = lora.rank, alpha = lora.alpha), embeddings, norms and lm_head train full-rank
as in lean-relora, with lean-relora's optimizer (8-bit AdamW); no warm start, no restarts.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from lean_relora.data.packing import build_data
from lean_relora.memory.trace import build_for_phase
from lean_relora.model.frozen_base import quant_state_tensors
from lean_relora.model.gradinit import sketch_bytes
from lean_relora.model.relora import target_modules
from lean_relora.recipe import load_recipe
from lean_relora.training.loop import setup, train
from lean_relora.training.optim import build_optimizer, set_lr
from lean_relora.training.progress import Reporter
from lean_relora.training.schedule import JaggedCosine
from lean_relora.training.step import eval_loss, micro_batch_loss

CORPORA = {
    "pydoc": "pydoc",  # CPython's bundled documentation
    # The Vim user manual (Debian's vim-runtime): 50-odd chapters of English prose about an editor, one document each
    "vim": "/usr/share/vim/vim90/doc/usr_*.txt",
}
COMMON = ["eval.every=0", "checkpoint.every=0", "log.every=10"]  # no evaluation or checkpoint inside the timed loop

# lean-relora's modes: recipe overrides on top of the tiny recipe. "GaLore's schedule": no full-rank warm start, no
# LR re-warm, the moments kept across a switch, P from the gradient from step 0 (one micro-batch per switch).
GALORE_SCHEDULE = ["relora.warm_start_steps=0", "relora.restart_warmup_steps=0", "relora.reset='keep'",
                   "relora.init='gradient'", "relora.init_batches=1"]
LEAN = {
    "lean-relora lora (today)": [],
    "lean-relora lora, gradient init": ["relora.init='gradient'", "relora.init_batches=1"],
    "lean-relora projected": ["relora.cycle='projected'", *GALORE_SCHEDULE],
    "lean-relora projected, fp32 Adam": ["relora.cycle='projected'", *GALORE_SCHEDULE, "optim.name='adamw'"],
    "lean-relora projected, unquantized base, fp32 Adam": ["relora.cycle='projected'", *GALORE_SCHEDULE,
                                                           "optim.name='adamw'", "lora.quant='none'"],
    "lean-relora projected, reset zero": ["relora.cycle='projected'", *GALORE_SCHEDULE, "relora.reset='zero'"],
    "lean-relora projected, today's schedule": ["relora.cycle='projected'", "relora.init='gradient'",
                                                "relora.init_batches=1"],
    "full-rank AdamW": ["optim.name='adamw'", "WARM"],
    "full-rank 8-bit AdamW": ["optim.name='adamw8bit'", "WARM"],
}
# galore-torch's GaLoreAdamW8bit runs CUDA kernels only ("Torch not compiled with CUDA enabled" on a CPU build)
PEERS = ("GaLore (galore-torch)", "GaLore (galore-torch), right projection", "APOLLO (apollo-torch)", "PEFT LoRA",
         "PEFT QLoRA")


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Every tensor of the optimizer's state, projection matrices of galore/apollo projectors included."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += tensor_bytes(value)
            elif hasattr(value, "ortho_matrix") and value.ortho_matrix is not None:
                matrices = value.ortho_matrix if isinstance(value.ortho_matrix, list) else [value.ortho_matrix]
                total += sum(tensor_bytes(m) for m in matrices if isinstance(m, torch.Tensor))
    return total


def lean_bytes(recipe, vocab: int) -> dict:
    """Trainable weights, gradients and optimizer state of lean-relora's low-rank phase (or the full-rank phase), from
    the very model and optimizer training builds, after one optimizer step creates the state."""
    phase = "full" if recipe.relora.warm_start_steps >= recipe.train.max_steps else "relora"
    model, optimizer = build_for_phase(recipe, vocab, phase)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    shapes = [(m.base.out_features, m.base.in_features) for m in model.modules() if hasattr(m, "lora_B")]
    sketches = sketch_bytes(shapes, recipe.lora.rank) if phase == "relora" and recipe.relora.init == "gradient" else 0
    return bytes_of(model, trainable, optimizer) | {"sketches": sketches}


def bytes_of(model: nn.Module, trainable: list[torch.Tensor], optimizer: torch.optim.Optimizer,
             gradients: int | None = None) -> dict:
    weights = sum(tensor_bytes(p) for p in trainable)
    ids = {id(p) for p in trainable}
    frozen = sum(tensor_bytes(p) for p in model.parameters() if id(p) not in ids)
    frozen += sum(tensor_bytes(b) for b in model.buffers())
    for m in model.modules():  # 4-bit storage (lean-relora's FrozenBase, bnb's Params4bit are parameters already)
        if hasattr(m, "base") and hasattr(m.base, "quant_state") and m.base.quant_state is not None:
            frozen += sum(tensor_bytes(t) for t in quant_state_tensors(m.base.quant_state))
    gradients = weights if gradients is None else gradients
    return {"trainable_bytes": weights, "gradient_bytes": gradients, "optimizer_bytes": state_bytes(optimizer),
            "frozen_bytes": frozen}


def run_lean(name: str, overrides: list[str], base: list[str], run_dir: Path, console: Console) -> dict:
    overrides = [o for o in overrides if o != "WARM"]
    recipe = load_recipe(None, base + overrides)
    if "WARM" in LEAN[name]:
        recipe = load_recipe(None, base + overrides + [f"relora.warm_start_steps={recipe.train.max_steps}"])
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    summary = train(recipe, run_dir, Reporter(run_dir / "metrics.jsonl", recipe.train.max_steps, live=False,
                                              console=console))
    data, _ = build_data(recipe.data, run_dir)  # the run's own tokenizer and blocks, cached in run_dir
    vocab = recipe.model.vocab_size or data.vocab_size
    # tokens/s of the low-rank phase alone (the full-rank warm start's dense steps run at another speed): the
    # log.every windows after the warm start, restarts and gradient inits included, weighted by their tokens
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "tokens_per_s" in w and w["step"] > recipe.relora.warm_start_steps + 10]
    seconds = sum(recipe.log.every * recipe.train.micro_batch_size * recipe.data.seq_len / w["tokens_per_s"]
                  for w in windows)
    low_rank = (recipe.log.every * recipe.train.micro_batch_size * recipe.data.seq_len * len(windows) / seconds
                if windows and recipe.relora.warm_start_steps < recipe.train.max_steps else summary.tokens_per_s)
    return {"eval_loss": summary.last_eval_loss, "tokens": summary.tokens, "tokens_per_s": summary.tokens_per_s,
            "low_rank_tokens_per_s": low_rank, "restarts": summary.restarts, **lean_bytes(recipe, vocab)}


def peer_model_and_optimizer(name: str, run, recipe):
    """The peer's model (from the run's dense model: the same initial weights) and its optimizer."""
    model = run.model
    lr, betas, eps = recipe.optim.lr, tuple(recipe.optim.betas), recipe.optim.eps
    targets = [m.weight for _, m in target_modules(model, recipe.lora.targets)]
    if name.startswith("GaLore") or name.startswith("APOLLO"):
        low = {id(p) for p in targets}
        others = [p for p in model.parameters() if id(p) not in low]
        projection = {"rank": recipe.lora.rank, "update_proj_gap": recipe.relora.restart_every,
                      "scale": recipe.lora.alpha / recipe.lora.rank,
                      "proj_type": "right" if "right" in name else "std"}
        if name.startswith("APOLLO"):
            from apollo_torch import APOLLOAdamW
            projection |= {"proj": "random", "scale_type": "channel"}
            groups = [{"params": others}, {"params": targets, **projection}]
            return model, APOLLOAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        groups = [{"params": others}, {"params": targets, **projection}]
        if "8-bit" in name:
            from galore_torch import GaLoreAdamW8bit
            return model, GaLoreAdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        from galore_torch import GaLoreAdamW
        return model, GaLoreAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, no_deprecation_warning=True)
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in target_modules(model, recipe.lora.targets)})
    config = PeftLoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, target_modules=kinds,
                            lora_dropout=recipe.lora.dropout)
    if name == "PEFT QLoRA":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recipe.lora.quant,
                                              bnb_4bit_use_double_quant=recipe.lora.double_quant,
                                              bnb_4bit_compute_dtype=torch.float32)
            model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                         dtype=torch.float32, device_map="cpu")
    model = get_peft_model(model, config)
    # embeddings, norms and lm_head train full-rank, as in lean-relora (peft would freeze them)
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    for p in model.get_output_embeddings().parameters():
        p.requires_grad_(True)
    return model, build_optimizer(model, recipe.optim, run.device)


def run_peer(name: str, base: list[str], run_dir: Path, console: Console) -> dict:
    probe = load_recipe(None, base)
    recipe = load_recipe(None, base + [f"relora.warm_start_steps={probe.train.max_steps}"])  # dense, no restarts
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    run = setup(recipe, run_dir)  # the same data, dense model (same seed) and loader as lean-relora's runs
    model, optimizer = peer_model_and_optimizer(name, run, recipe)
    # PEFT's wrapper forwards through itself; the loss (lean-relora's chunked one) reads the transformers model's
    # decoder and lm_head, which get_base_model returns with the LoRA layers injected (the same parameters).
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    run.model = model
    schedule = JaggedCosine.of(recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    steps, tokens, gradients = recipe.train.max_steps, 0, 0
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        set_lr(optimizer, recipe.optim.lr * schedule(step))
        total = 0.0
        for micro in range(recipe.train.grad_accum_steps):
            ids, _ = run.loader.get(step * recipe.train.grad_accum_steps + micro)
            loss = micro_batch_loss(run, ids, model)
            (loss / recipe.train.grad_accum_steps).backward()
            total += loss.item()
            tokens += ids.numel()
        norm = nn.utils.clip_grad_norm_(params, recipe.optim.grad_clip or math.inf)
        if step == steps - 1:
            gradients = sum(tensor_bytes(p.grad) for p in params if p.grad is not None)
        if math.isfinite(total) and math.isfinite(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            console.print(f"{name}: step {step + 1}, loss {total / recipe.train.grad_accum_steps:.4f}")
    seconds = time.perf_counter() - start
    run.loader.close()
    loss = eval_loss(model, recipe, run.device, run.data)
    return {"eval_loss": loss, "tokens": tokens, "tokens_per_s": tokens / seconds, "restarts": 0,
            **bytes_of(model, params, optimizer, gradients), "sketches": 0}


def throughput(base: list[str], modes: dict[str, list[str]], steps: int, run_dir: Path, console: Console) -> dict:
    """Low-rank phase tokens/s of lean-relora's modes measured side by side in one process: their steps interleaved
    (one of each in turn, so a shared machine's changing load falls on all alike), the median step time, plus one
    restart each (merge, optimizer reset, gradient init where the mode has one) spread over its cycle."""
    from lean_relora.training.restart import restart
    from lean_relora.training.step import train_step
    runs = {}
    for name, overrides in modes.items():
        recipe = load_recipe(None, base + overrides + ["relora.warm_start_steps=0"])
        directory = run_dir / name.replace(" ", "-")
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        runs[name] = setup(recipe, directory)
    times = {name: [] for name in runs}
    for step in range(steps + 3):
        for name, run in runs.items():
            start = time.perf_counter()
            train_step(run)
            if step >= 3:  # the first steps allocate the optimizer state
                times[name].append(time.perf_counter() - start)
    out = {}
    for name, run in runs.items():
        start = time.perf_counter()
        record = restart(run)
        restart_seconds = time.perf_counter() - start
        recipe = run.recipe
        step_tokens = recipe.train.micro_batch_size * recipe.data.seq_len * recipe.train.grad_accum_steps
        median = sorted(times[name])[len(times[name]) // 2]
        cycle = recipe.relora.restart_every
        out[name] = {"step_seconds": median, "restart_seconds": restart_seconds,
                     "tokens_per_s": (cycle * step_tokens + record.get("init_tokens", 0))
                     / (cycle * median + restart_seconds),
                     "trained_tokens_per_s": cycle * step_tokens / (cycle * median + restart_seconds)}
        run.loader.close()
        console.print(f"{name}: step {median * 1000:.0f} ms (median of {len(times[name])}), restart "
                      f"{restart_seconds:.2f} s, {out[name]['tokens_per_s']:,.0f} tokens/s over a cycle of {cycle} "
                      f"steps ({out[name]['trained_tokens_per_s']:,.0f} trained tokens/s)")
    return out


def missing_peers() -> dict[str, str]:
    """Peer name -> the package it needs, for those that cannot be imported."""
    need = {"GaLore": "galore_torch", "APOLLO": "apollo_torch", "PEFT": "peft"}
    out = {}
    for prefix, module in need.items():
        try:
            __import__(module)
        except ImportError as error:
            out[prefix] = f"{module.replace('_', '-')} ({error})"
    return out


def table(out: Path) -> str:
    """Markdown: one row per method, a column per (corpus, seed) of eval loss; tokens/s and bytes from seed 0."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/result.json"))]
    runs = sorted({(r["corpus"], r["seed"]) for r in results})
    methods = list(dict.fromkeys(r["method"] for r in sorted(results, key=lambda r: r["order"])))
    head = ["method", *(f"eval loss {c} s{s}" for c, s in runs), "tokens", "tokens/s (pydoc s0)",
            "low-rank phase tokens/s (pydoc s0)", "trainable + grad + optimizer (KiB)", "sketches (KiB)",
            "frozen weights (KiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        mine = {(r["corpus"], r["seed"]): r for r in results if r["method"] == method}
        first = mine.get(("pydoc", 0)) or next(iter(mine.values()))
        cells = [method, *(f"{mine[k]['eval_loss']:.3f}" if k in mine else "-" for k in runs),
                 f"{first['tokens']:,}", f"{first['tokens_per_s']:,.0f}",
                 f"{first.get('low_rank_tokens_per_s', first['tokens_per_s']):,.0f}",
                 f"{(first['trainable_bytes'] + first['gradient_bytes'] + first['optimizer_bytes']) / 1024:,.0f}",
                 f"{first['sketches'] / 1024:,.0f}", f"{first['frozen_bytes'] / 1024:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="pydoc", help="pydoc, vim (the Vim user manual) or a data.source")
    parser.add_argument("--seed", type=int, default=0, help="train.seed (model init, factor draws)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every method")
    parser.add_argument("--only", nargs="+", metavar="METHOD", help="run only these methods")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for all runs")
    parser.add_argument("--out", type=Path, default=Path("results/peers"))
    parser.add_argument("--table", action="store_true", help="print the table of the results under --out and stop")
    parser.add_argument("--throughput", type=int, metavar="STEPS", help="only time lean-relora's lora and projected "
                        "modes' low-rank steps, interleaved, STEPS each (plus one restart each)")
    args = parser.parse_args()
    console = Console(width=150)
    if args.table:
        console.print(table(args.out), soft_wrap=True)
        return
    corpus = CORPORA.get(args.corpus, args.corpus)
    base = [f"data.source={json.dumps(corpus)}", f"train.seed={args.seed}", f"train.max_steps={args.steps}",
            "train.device='cpu'", *COMMON, *args.overrides]
    if args.throughput:
        modes = {"lora": [], "projected": LEAN["lean-relora projected"]}
        result = throughput(base, modes, args.throughput, args.out / "throughput", console)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"throughput-{args.corpus}-s{args.seed}.json").write_text(json.dumps(result, indent=1))
        ratio = result["projected"]["tokens_per_s"] / result["lora"]["tokens_per_s"]
        console.print(f"projected / lora tokens/s: {ratio:.3f}")
        return
    missing = missing_peers()
    for prefix, why in missing.items():
        console.print(f"[yellow]{prefix}: missing, skipped: {why}[/]")
    names = [*LEAN, *PEERS]
    chosen = [n for n in names if not args.only or n in args.only]
    directory = args.out / f"{Path(args.corpus).name if args.corpus in CORPORA else 'custom'}-s{args.seed}"
    for order, name in enumerate(names):
        if name not in chosen:
            continue
        if any(name.startswith(prefix) for prefix in missing):
            continue
        slug = name.lower().replace(" ", "-").replace(",", "").replace("(", "").replace(")", "").replace("'", "")
        run_dir = directory / slug
        console.print(f"[bold]{name}[/] ({args.corpus}, seed {args.seed})")
        try:
            result = (run_lean(name, LEAN[name], base, run_dir, console) if name in LEAN
                      else run_peer(name, base, run_dir, console))
        except Exception as error:  # one method failing (a peer's CUDA-only path) leaves the others' results
            console.print(f"[red]{name}: failed: {type(error).__name__}: {error}[/]")
            continue
        result |= {"method": name, "corpus": args.corpus, "seed": args.seed, "steps": args.steps, "order": order}
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))
        console.print(f"{name}: eval loss {result['eval_loss']:.4f}, {result['tokens']:,} tokens, "
                      f"{result['tokens_per_s']:,.0f} tokens/s")
    console.print(table(args.out), soft_wrap=True)


if __name__ == "__main__":
    main()
