"""Data throughput: `prepare` (tokenizing into token files) on the pydoc corpus and on a generated jsonl, and the
training-side reader (memory-mapped blocks by index, through the batch loader), against what the 1.3B recipe's step
consumes.

    .venv/bin/python bench/data.py [--mb 200] [--out results/data.json]

The jsonl is generated (seeded words drawn with pydoc's word frequencies, one document per line) into a temporary
directory.
Its tokenizer is the BPE `prepare` trains on pydoc (a fast, Rust tokenizer, loaded from that prepared directory), so
the jsonl's time is tokenizing and writing alone. The reader serves micro-batches of the 1.3B recipe's shape (8 x 512
tokens) in the training order (a seeded permutation per epoch), through BatchLoader as train_step asks for them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from lean_relora.data.packing import build_data
from lean_relora.data.prefetch import BatchLoader
from lean_relora.data.prepare import prepare_data
from lean_relora.recipe import DataConfig, load_recipe

# The 1.3B step's need, an upper bound: one H100 SXM's dense bf16 peak (989 TFLOP/s) at 100% utilisation, over the
# 6 N FLOP per trained token of a forward and backward pass of N = 1.3e9 parameters (attention, recomputation and
# ReLoRA's frozen base only make a real step slower, i.e. need fewer tokens/s).
GPU_PEAK_FLOPS, PARAMS = 989e12, 1.3e9
NEED = GPU_PEAK_FLOPS / (6 * PARAMS)


def generate_jsonl(path: Path, megabytes: int, seed: int = 0) -> int:
    """Documents of 50-400 words drawn with pydoc's own word frequencies: text a BPE trained on pydoc cuts into
    tokens of a realistic length (random letters would give short tokens and flatter tokens/s)."""
    from pydoc_data.topics import topics

    vocabulary, counts = np.unique(" ".join(topics.values()).split(), return_counts=True)
    rng = np.random.default_rng(seed)
    written, documents = 0, 0
    with open(path, "w") as f:
        while written < megabytes * 1_000_000:
            lengths = rng.integers(50, 400, size=1000)
            words = rng.choice(vocabulary, size=int(lengths.sum()), p=counts / counts.sum())
            rows = np.split(words, np.cumsum(lengths)[:-1])
            lines = "".join(json.dumps({"text": " ".join(row)}) + "\n" for row in rows)
            f.write(lines)
            written, documents = written + len(lines), documents + 1000
    return documents


def timed_prepare(cfg: DataConfig, out: Path) -> dict:
    started, cpu = time.perf_counter(), time.process_time()  # process time: every thread, the tokenizer's too
    manifest = prepare_data(cfg, out, console=Console(stderr=True))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    train = manifest["splits"]["train"]
    tokens = train["tokens"] + manifest["splits"]["eval"]["tokens"]
    return {"documents": train["documents"] + manifest["splits"]["eval"]["documents"], "tokens": tokens,
            "train tokenize tokens/s": train["tokens_per_s"], "wall s (all)": seconds,
            "tokens/s (all, wall)": tokens / seconds, "cpu s (all)": cpu, "cores used": cpu / seconds,
            "tokens per cpu s": tokens / cpu, "bytes": sum(p.stat().st_size for p in out.glob("*.bin"))}


def reader(cfg: DataConfig, run_dir: Path, batch: int, seq_len: int, seconds: float) -> dict:
    cfg = DataConfig(**{**cfg.__dict__, "seq_len": seq_len})
    data, _ = build_data(cfg, run_dir)
    loader = BatchLoader(data, batch)
    started, index = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        ids, _ = loader.get(index)
        index += 1
    elapsed = time.perf_counter() - started
    loader.close()
    return {"micro-batches": index, "tokens/s": index * batch * seq_len / elapsed,
            "step waited s": loader.wait_seconds, "train blocks": data.num_train_blocks}


def mask_cost(rounds: int = 20) -> dict:
    """Training step time of the tiny_cpu model on 8 x 128 pydoc blocks, causal over the block vs data.document_mask,
    steps interleaved so that both see the same machine."""
    from lean_relora.data.packing import document_positions
    from lean_relora.model.build import build_model

    recipe = load_recipe(None)
    with tempfile.TemporaryDirectory() as tmp:
        data, tok = build_data(recipe.data, Path(tmp))
    model = build_model(recipe.model, len(tok), recipe.data.seq_len, tok.eos_token_id)
    times = {"causal": [], "document_mask": []}
    for i in range(rounds + 2):
        ids = data.train_batch(i, 8)
        for name, positions in (("causal", None), ("document_mask", document_positions(ids, tok.eos_token_id))):
            started = time.perf_counter()
            model(input_ids=ids, labels=ids, position_ids=positions).loss.backward()
            if i >= 2:  # the first rounds warm up
                times[name].append(time.perf_counter() - started)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return {**{f"{name} step s": t for name, t in median.items()},
            "document_mask / causal": median["document_mask"] / median["causal"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the generated jsonl, in MB")
    parser.add_argument("--out", type=Path, default=Path("results/data.json"))
    args = parser.parse_args()
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "1b3_12gb.toml")
    batch, seq_len = recipe.train.micro_batch_size, recipe.data.seq_len
    results = {"cores": os.cpu_count(), "load average before": os.getloadavg()[0], "need tokens/s": NEED}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pydoc = DataConfig(source="pydoc", bpe_vocab_size=4096)
        results["prepare pydoc (BPE trained)"] = timed_prepare(pydoc, tmp / "pydoc")
        results["jsonl documents"] = generate_jsonl(tmp / "gen.jsonl", args.mb)
        generated = DataConfig(source=str(tmp / "gen.jsonl"), tokenizer=str(tmp / "pydoc" / "tokenizer"),
                               eval_fraction=0.001)
        results[f"prepare {args.mb} MB jsonl"] = timed_prepare(generated, tmp / "gen")
        prepared = DataConfig(**{**generated.__dict__, "source": f"prepared:{tmp / 'gen'}"})
        results["reader (8 x 512, loader)"] = reader(prepared, tmp / "run", batch, seq_len, seconds=20)
    results["step with document_mask (tiny_cpu, 8 x 128)"] = mask_cost()
    results["load average after"] = os.getloadavg()[0]
    results["reader / need"] = results["reader (8 x 512, loader)"]["tokens/s"] / NEED
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    table = Table(title=f"data throughput ({results['cores']} cores)")
    for heading in ("what", "documents", "tokens", "tokens/s", "cores used", "tokens per cpu s"):
        table.add_column(heading, justify="left" if heading == "what" else "right")
    for name in ("prepare pydoc (BPE trained)", f"prepare {args.mb} MB jsonl"):
        r = results[name]
        table.add_row(name + " (tokenize train)", f"{r['documents']:,}", f"{r['tokens']:,}",
                      f"{r['train tokenize tokens/s']:,.0f}")
        table.add_row(name + " (wall, all)", "", "", f"{r['tokens/s (all, wall)']:,.0f}", f"{r['cores used']:.2f}",
                      f"{r['tokens per cpu s']:,.0f}")
    r = results["reader (8 x 512, loader)"]
    table.add_row("reader (8 x 512 blocks, random order)", "", f"{r['micro-batches'] * batch * seq_len:,}",
                  f"{r['tokens/s']:,.0f}")
    table.add_row("1.3B step need (H100 peak bf16, 6N FLOP/token)", "", "", f"{NEED:,.0f}")
    Console(width=150).print(table)
    mask = results["step with document_mask (tiny_cpu, 8 x 128)"]["document_mask / causal"]
    print(f"reader / need = {results['reader / need']:,.0f}x; step time document_mask / causal = {mask:.2f}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
