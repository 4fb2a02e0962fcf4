"""GPU acceptance: one command that shows, on a machine with one CUDA GPU, that lean-relora's CUDA path works and
what it costs, in a few minutes on an H100-class GPU. It prints one table per part and writes one JSON file per part
into --out DIR as soon as that part ends:

  environment.json  versions, the GPU, the arguments; rewritten at the end with every part's status and seconds;
  memory.json       (a) memory: for the 350M and 1.3B recipes' shapes (on --device cpu also the tiny recipe, which on
                    a GPU measures fixed overheads only), random tokens, their micro-batch, gradient accumulation
                    shortened to 2 micro-batches, a few steps including a restart: measured peak (torch's
                    max_memory_allocated and max_memory_reserved, plus bnb's paged optimizer state, which torch does
                    not count) beside memory-estimate's traced and analytic peaks, and their ratio. The file is
                    rewritten after each shape, so a run stopped during 1.3B keeps 350M's row;
  restarts.json     (c) restarts: seconds per merge (every layer: fp32 master -> merge -> requantize) and its share of
                    a cycle of the recipe (restart_every steps at the recipe's full gradient accumulation), from (a)'s
                    rows: run right after (a); if (a) failed it says so and covers only the shapes (a) measured;
  throughput.json   (b) throughput: tokens/s of lean-relora vs PEFT QLoRA vs full-rank + 8-bit AdamW at equal
                    settings (same model, rank, targets, micro-batch, autocast; LoRA factors alone train in both LoRA
                    variants), steps interleaved in one process, as ratios; on CUDA also lean-relora with its
                    checkpointed activations in host RAM (train.offload_activations), which the 1.3B and 7B recipes
                    turn on. Every variant computes its loss with the chunked loss training uses
                    (lean_relora.model.loss.causal_lm_loss, train.loss_chunk_tokens tokens' logits at a time),
                    never Hugging Face's `model(input_ids, labels).loss`:
                      lean-relora (and its offloaded twin): lean_relora.training.step.micro_batch_loss, the training
                        step's own function (causal_lm_loss under train.offload_activations' hooks where that is on);
                      PEFT QLoRA: causal_lm_loss on the PEFT model's underlying transformers model (get_base_model(),
                        LoRA layers injected; its lm_head is a plain Linear);
                      full-rank: causal_lm_loss on the dense transformers model;
  cuda_tests.json   (d) the `pytest -m cuda` result (bench/gpu_run.sh runs pytest as a stage of its own and passes
                    --skip cuda_tests).

Each part catches its own failure (any Exception, a subprocess timeout included): its file then holds
{"status": "failed", "error", "traceback"} and whatever it had measured, and the next part runs. A part's file says
{"status": "running"} while it runs, so a run killed from outside shows where it was. Exit code 1 if any part failed.

    python bench/gpu_acceptance.py                               # on the GPU, into results/gpu_acceptance/
    python bench/gpu_acceptance.py --device cpu --out /tmp/ga    # the same at reduced sizes on a CPU
    bash bench/gpu_run.sh                                        # preflight, pytest -m cuda, then this (a GPU window)

PEFT is the peer of part (b): `pip install peft` (a missing peft is reported, not fatal).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # measure the checkout this script is in, not whichever lean_relora is installed
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # json_out beside this file, also when imported

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402
from json_out import write_json  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

from lean_relora.memory.analytic import GIB, analytic, recipe_vocab_size  # noqa: E402
from lean_relora.memory.estimate import cublas_workspace_bytes  # noqa: E402
from lean_relora.memory.measure import measure, relora_run  # noqa: E402
from lean_relora.memory.trace import trace  # noqa: E402
from lean_relora.model.build import build_model  # noqa: E402
from lean_relora.model.loss import causal_lm_loss  # noqa: E402
from lean_relora.model.relora import target_modules  # noqa: E402
from lean_relora.recipe import Recipe, load_recipe  # noqa: E402
from lean_relora.training.step import autocast_context, micro_batch_loss  # noqa: E402

SHAPES = {"tiny": "tiny_cpu.toml", "350M": "350m_12gb.toml", "1.3B": "1b3_12gb.toml"}
PARTS = ("environment", "memory", "restarts", "throughput", "cuda_tests")  # the order they run in
CUDA_TESTS = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
              "--continue-on-collection-errors", "tests"]


# ---------------------------------------------------------------------------------------------------------- files

class PartFile:
    """One part's JSON file. `data` is what the part has so far; save() rewrites the file with it."""

    def __init__(self, path: Path):
        self.path, self.data, self.started = path, {}, time.perf_counter()

    def save(self, status: str = "running", **extra) -> dict:
        record = {"status": status, **self.data, **extra, "seconds": time.perf_counter() - self.started}
        write_json(self.path, record)
        return record


@dataclass
class Context:
    device: str
    out: Path
    console: Console
    shapes: list[str]
    throughput_shape: str
    rounds: int
    skip: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    records: dict = field(default_factory=dict)  # part name -> the record its file ended with


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_part(name: str, part: Callable[[Context, PartFile], dict], ctx: Context) -> dict:
    """Run one part; its file holds its result, or its error and traceback. Never raises for the part's failure."""
    file = PartFile(ctx.out / f"{name}.json")
    file.save("running")
    try:
        result = part(ctx, file)
    except Exception as error:  # subprocess.TimeoutExpired and torch.cuda.OutOfMemoryError are Exceptions too
        record = file.save("failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        ctx.console.print(f"[red]part {name} failed[/red]: {record['error']} (traceback in {file.path})")
    else:
        file.data.update(result)
        record = file.save(file.data.pop("status", "ok"))
    free_device_memory()  # after the except block, whose traceback held the failed part's tensors
    ctx.records[name] = record
    return record


# ---------------------------------------------------------------------------------------------------------- shapes

def default_shapes(device: str) -> list[str]:
    """The tiny shape measures fixed overheads only on a GPU; on a CPU it is the one that runs in seconds."""
    return ["350M", "1.3B"] if device == "cuda" else list(SHAPES)


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


# ---------------------------------------------------------------------------------------------------------- (a)

def memory_part(ctx: Context, file: PartFile) -> dict:
    rows = file.data.setdefault("rows", [])
    file.data["shapes"] = ctx.shapes
    file.save("running")  # the shapes to come, before the first of them
    table = Table(title=f"(a) peak memory on {ctx.device}, ReLoRA phase after a restart (GiB)")
    # What torch's allocated counter should read: the traced tensors plus the cuBLAS workspaces (memory-estimate's
    # PhaseEstimate.allocated); on a CPU the measurement is live tensor bytes, which the trace alone predicts.
    workspaces = cublas_workspace_bytes(torch.cuda.get_device_capability()) if ctx.device == "cuda" else 0
    for column in ("shape", "params", "micro-batch", "allocated", "reserved", "paged", "cuBLAS ws", "measured",
                   "predicted", "analytic", "measured / predicted"):
        table.add_column(column, justify="right")
    gib = lambda n: "-" if n is None else f"{n / GIB:.3f}"  # noqa: E731
    for name in ctx.shapes:
        recipe = shape_recipe(name, ctx.device)
        vocab = recipe_vocab_size(recipe)
        measured = measure(recipe, vocab, ctx.device)
        free_device_memory()  # the measured run is gone before the next shape starts
        traced, formulas = trace(recipe, vocab).peak, sum(analytic(recipe, vocab).values())
        predicted = traced + workspaces
        with torch.device("meta"):
            params = sum(p.numel() for p in build_model(recipe.model, vocab, recipe.data.seq_len).parameters())
        rows.append({"shape": name, "params": params, "micro_batch": recipe.train.micro_batch_size,
                     "seq_len": recipe.data.seq_len, **asdict(measured), "measured": measured.peak,
                     "traced": traced, "workspaces_counted": workspaces, "predicted": predicted,
                     "analytic": formulas + workspaces, "ratio": measured.peak / predicted,
                     "recipe": recipe.to_dict()})
        file.save("running")  # this shape's row survives whatever happens to the next one
        table.add_row(name, f"{params / 1e6:,.0f}M", f"{recipe.train.micro_batch_size} x {recipe.data.seq_len}",
                      gib(measured.peak_allocated), gib(measured.peak_reserved), gib(measured.paged_bytes),
                      gib(measured.workspace_bytes), gib(measured.peak), gib(predicted), gib(formulas + workspaces),
                      f"{measured.peak / predicted:.3f}")
    ctx.console.print(table)
    return {}


# ---------------------------------------------------------------------------------------------------------- (c)

def restart_part(ctx: Context, file: PartFile) -> dict:
    memory = ctx.records.get("memory", {})
    rows = memory.get("rows", [])
    result = {}
    if memory.get("status") != "ok":
        why = (f"part (a) memory {memory.get('status', 'did not run')}"
               + (f": {memory['error']}" if "error" in memory else ""))
        missing = [s for s in memory.get("shapes", ctx.shapes) if s not in {r["shape"] for r in rows}]
        result = {"status": "skipped", "skipped": f"{', '.join(missing) or 'every shape'}: {why}"}
        ctx.console.print(f"(c) restart cost: skipped for {result['skipped']}")
        if not rows:
            return result
    table = Table(title="(c) restart cost: merge of every layer vs the recipe's cycle")
    for column in ("shape", "merge s", "step s (full accumulation)", "cycle steps", "share of cycle"):
        table.add_column(column, justify="right")
    out = []
    for row in rows:
        recipe = row["recipe"]
        accum_measured = row["tokens_per_step"] // (row["micro_batch"] * row["seq_len"])
        accum_recipe = load_recipe(ROOT / "recipes" / SHAPES[row["shape"]]).train.grad_accum_steps
        step = row["step_seconds"] / accum_measured * accum_recipe
        cycle = recipe["relora"]["restart_every"] * step
        out.append({"shape": row["shape"], "merge_seconds": row["merge_seconds"], "step_seconds": step,
                    "cycle_steps": recipe["relora"]["restart_every"], "share_of_cycle": row["merge_seconds"] / cycle})
        table.add_row(row["shape"], f"{row['merge_seconds']:.3f}", f"{step:.3f}",
                      f"{recipe['relora']['restart_every']:,}", f"{100 * row['merge_seconds'] / cycle:.4f}%")
    ctx.console.print(table)
    return {**result, "rows": out}


# ---------------------------------------------------------------------------------------------------------- (b)

@dataclass
class Variant:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor], torch.Tensor]  # the mean next-token loss of a micro-batch, run under autocast


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


def throughput_recipe(shape: str, device: str) -> Recipe:
    recipe = shape_recipe(shape, device)
    lora = replace(recipe.lora, train_embeddings=False, train_norms=False, train_lm_head=False)  # as PEFT QLoRA
    # the plain variant keeps its activations on the device; the offloaded twin (CUDA) turns the hooks on
    return replace(recipe, lora=lora, train=replace(recipe.train, offload_activations=False))


def build_variants(recipe: Recipe, vocab: int, device: str, console: Console) -> dict[str, Variant]:
    """The compared variants, each with its model, optimizer and loss (all the chunked loss, see the docstring)."""
    chunk = recipe.train.loss_chunk_tokens
    run = relora_run(recipe, vocab, torch.device(device))
    variants = {"lean-relora": Variant(run.model, run.optimizer, lambda ids: micro_batch_loss(run, ids))}
    if device == "cuda" and recipe.model.gradient_checkpointing:  # what train.offload_activations costs in time
        offloaded = copy.copy(run)  # the same model and optimizer; only the recipe the step reads differs
        offloaded.recipe = replace(recipe, train=replace(recipe.train, offload_activations=True))
        variants["lean-relora, activations offloaded"] = Variant(run.model, run.optimizer,
                                                                 lambda ids: micro_batch_loss(offloaded, ids))
    try:
        peft = peft_qlora(recipe, vocab, device)
    except ImportError as error:
        console.print(f"PEFT QLoRA: skipped, {error} (pip install peft)")
    else:
        hf = peft.get_base_model()  # the transformers model, LoRA layers injected: .base_model and lm_head as ours
        variants["PEFT QLoRA"] = Variant(peft, eight_bit_adamw(peft, device, recipe.optim.lr),
                                         lambda ids: causal_lm_loss(hf, ids, chunk))
    torch.manual_seed(0)
    dense = build_model(recipe.model, vocab, recipe.data.seq_len).to(device)
    name = "full-rank bf16 + 8-bit AdamW" if recipe.model.dtype == "bf16" else "full-rank + 8-bit AdamW"
    variants[name] = Variant(dense, eight_bit_adamw(dense, device, recipe.optim.lr),
                             lambda ids: causal_lm_loss(dense, ids, chunk))
    return variants


def timed_step(variant: Variant, ids: torch.Tensor, recipe: Recipe, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast_context(recipe, torch.device(device)):
        loss = variant.loss(ids)
    loss.backward()
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput_part(ctx: Context, file: PartFile) -> dict:
    shape, device, rounds = ctx.throughput_shape, ctx.device, ctx.rounds
    recipe = throughput_recipe(shape, device)
    vocab = recipe_vocab_size(recipe)
    file.data.update(shape=shape, rounds=rounds, loss_chunk_tokens=recipe.train.loss_chunk_tokens)
    variants = build_variants(recipe, vocab, device, ctx.console)
    ids = torch.randint(0, vocab, (recipe.train.micro_batch_size, recipe.data.seq_len), device=device)
    times = {name: [] for name in variants}
    for variant in variants.values():  # warm up kernels and the allocator
        for _ in range(2):
            timed_step(variant, ids, recipe, device)
    names = list(variants)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # no variant always goes first
            times[name].append(timed_step(variants[name], ids, recipe, device))
    tokens = ids.numel()
    speed = {name: tokens / statistics.median(t) for name, t in times.items()}
    peer = speed.get("PEFT QLoRA")
    table = Table(title=f"(b) tokens/s, {shape} shape on {device}: micro-batch {recipe.train.micro_batch_size} x "
                        f"{recipe.data.seq_len}, rank {recipe.lora.rank}, chunked loss "
                        f"({recipe.train.loss_chunk_tokens} tokens), median of {rounds} interleaved steps")
    for column in ("variant", "tokens/s", "vs PEFT QLoRA", "trainable params"):
        table.add_column(column, justify="right")
    out = {}
    for name, variant in variants.items():
        trainable = sum(p.numel() for p in variant.model.parameters() if p.requires_grad)
        ratio = speed[name] / peer if peer else None
        out[name] = {"tokens_per_s": speed[name], "ratio_to_peft": ratio, "trainable": trainable,
                     "step_seconds": times[name]}
        table.add_row(name, f"{speed[name]:,.0f}", "-" if ratio is None else f"{ratio:.2f}x", f"{trainable:,}")
    ctx.console.print(table)
    del variants
    free_device_memory()
    return {"micro_batch": recipe.train.micro_batch_size, "seq_len": recipe.data.seq_len, "rank": recipe.lora.rank,
            "variants": out}


# ---------------------------------------------------------------------------------------------------------- (d)

def cuda_tests_part(ctx: Context, file: PartFile) -> dict:
    result = subprocess.run(CUDA_TESTS, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = result.stdout.strip().splitlines()
    summary = lines[-1] if lines else result.stderr.strip()[-300:]
    ctx.console.print(f"(d) pytest -m cuda: {summary} (exit code {result.returncode})")
    return {"status": "ok" if result.returncode in (0, 5) else "failed",  # 5: none collected
            "summary": summary, "returncode": result.returncode, "output": result.stdout[-20000:],
            "stderr": result.stderr[-4000:]}


# ---------------------------------------------------------------------------------------------------------- env

def versions() -> dict:
    import importlib

    out = {"python": platform.python_version()}
    for module in ("torch", "bitsandbytes", "transformers", "tokenizers", "huggingface_hub", "safetensors",
                   "datasets", "peft", "accelerate"):
        try:
            out[module] = importlib.import_module(module).__version__
        except Exception as error:  # a missing peer is information, not a failure
            out[module] = f"unavailable: {type(error).__name__}: {error}"
    return out


def environment_part(ctx: Context, file: PartFile) -> dict:
    import lean_relora

    env = {**versions(), "cuda": torch.version.cuda, "device": ctx.device, "threads": torch.get_num_threads(),
           "lean_relora": str(Path(lean_relora.__file__).parent), "argv": ctx.argv, "shapes": ctx.shapes,
           "throughput_shape": ctx.throughput_shape, "rounds": ctx.rounds, "skip": ctx.skip,
           "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
    ctx.console.print(" ".join(f"{k} {v}" for k, v in env.items() if k not in ("argv",)))
    return env


def quiet_libraries() -> None:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional CPU kernel package we do not need
    hf_logging.disable_progress_bar()  # the peer's save/load bars of a model built a second ago
    # peft (the peer of part b, not our code) calls transformers' deprecated is_gradient_checkpointing
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


PART_FUNCTIONS = {"environment": environment_part, "memory": memory_part, "restarts": restart_part,
                  "throughput": throughput_part, "cuda_tests": cuda_tests_part}


def run_all(ctx: Context) -> int:
    """Every part not skipped, in PARTS order; then environment.json gains the parts' statuses. 1 if any failed."""
    started = time.perf_counter()
    for name in PARTS:
        if name not in ctx.skip:
            run_part(name, PART_FUNCTIONS[name], ctx)
    statuses = {name: {"status": r["status"], "seconds": round(r["seconds"], 1)} for name, r in ctx.records.items()}
    env = ctx.records.get("environment", {})
    write_json(ctx.out / "environment.json", {**env, "parts": statuses,
                                              "total_seconds": time.perf_counter() - started})
    failed = [name for name, r in ctx.records.items() if r["status"] == "failed"]
    ctx.console.print(f"{time.perf_counter() - started:.0f} s; " + ", ".join(
        f"{name} {r['status']}" for name, r in statuses.items()) + f"; wrote {ctx.out}/")
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_acceptance",
                        help="folder for the parts' JSON files [default: results/gpu_acceptance/]")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timed steps per variant in part (b)")
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated shapes of parts (a) and (c), of {','.join(SHAPES)} "
                             "[default: 350M,1.3B on cuda, all three on cpu]")
    parser.add_argument("--throughput-shape", choices=list(SHAPES), default=None,
                        help="shape of part (b) [default: 350M on cuda, tiny on cpu]")
    parser.add_argument("--skip", action="append", default=[], choices=[p for p in PARTS if p != "environment"],
                        help="a part not to run (repeatable); its file is not written")
    args = parser.parse_args(argv)
    for shape in args.shapes or ():
        if shape not in SHAPES:
            parser.error(f"--shapes: {shape!r} is not one of {', '.join(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device is visible; run with --device cpu for the reduced CPU version")
    ctx = Context(device=args.device, out=args.out, console=Console(width=160),
                  shapes=args.shapes or default_shapes(args.device),
                  throughput_shape=args.throughput_shape or ("350M" if args.device == "cuda" else "tiny"),
                  rounds=args.rounds, skip=args.skip, argv=sys.argv[1:] if argv is None else argv)
    return run_all(ctx)


if __name__ == "__main__":
    sys.exit(main())
