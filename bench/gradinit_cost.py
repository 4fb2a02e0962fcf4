"""What relora.init = "gradient" adds to a restart of the 1.3B recipe, extrapolated as bench/throughput.py does the
merge: the sketch arithmetic timed per layer shape on this machine, the extra forward/backward passes counted.

    .venv/bin/python bench/gradinit_cost.py [--init-batches 4] [--repeats 3]

Per restart the init runs 2 x init_batches micro-batch passes (forward and backward, without the weight gradients
a step computes, so at most the cost of that many micro-batches of a step) and, per target layer and micro-batch,
the sketch update (pass 1: x^T (g Omega) with Omega regenerated; pass 2: g^T (x Q)), plus once per layer a QR of
the in x k sketch and an SVD of the out x k one. A 1.3B cycle is 5,000 steps x 144 micro-batches of 8 x 512 tokens.
Two shares are printed: against throughput.py's GPU cycle at 50,000 tokens/s (this CPU's sketch time against a GPU's
step time: pessimistic), and like for like, against the target layers' own matmuls timed on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

from lean_relora.model.gradinit import Sketch, sketch_bytes
from lean_relora.recipe import load_recipe

RECIPE = Path(__file__).parent.parent / "recipes" / "1b3_12gb.toml"


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_seconds(out_features: int, in_features: int, rank: int, tokens: int, repeats: int) -> dict[str, float]:
    """Seconds of one micro-batch's sketch update in each pass, and of the per-layer QR + SVD, on this machine."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=g, dtype=torch.bfloat16)  # the activations are bf16 in the recipe
    grad = torch.randn(tokens, out_features, generator=g, dtype=torch.bfloat16)
    sketch = Sketch(out_features, in_features, rank, seed=1, device=torch.device("cpu"))
    weight = torch.randn(out_features, in_features, generator=g)
    x32 = x.float()
    forward = timed(lambda: x32 @ weight.t(), repeats)  # the step's own matmul, in the sketch's fp32
    range_pass = timed(lambda: sketch.add(x, grad), repeats)
    factor = timed(lambda: (sketch.to_projection(), sketch.right_vectors(rank)), 1)
    projection_pass = timed(lambda: sketch.add(x, grad), repeats)
    return {"range_pass": range_pass, "projection_pass": projection_pass, "qr_and_svd": factor, "forward": forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-batches", type=int, default=None, help="default: the recipe's relora.init_batches")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/gradinit_cost.json"))
    args = parser.parse_args()
    recipe = load_recipe(RECIPE, ["relora.init='gradient'"])
    batches = args.init_batches or recipe.relora.init_batches
    h, f, layers, rank = (recipe.model.hidden_size, recipe.model.intermediate_size, recipe.model.num_layers,
                          recipe.lora.rank)
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len
    shapes = {"square": ((h, h), 4), "up": ((f, h), 2), "down": ((h, f), 1)}  # (out, in), count per block
    per_shape = {name: layer_seconds(o, i, rank, tokens, args.repeats) for name, ((o, i), _) in shapes.items()}
    sketch_seconds = layers * sum(count * (batches * (s["range_pass"] + s["projection_pass"]) + s["qr_and_svd"])
                                  for (_, count), s in zip(shapes.values(), per_shape.values()))
    micro_batches_per_cycle = recipe.relora.restart_every * recipe.train.grad_accum_steps
    passes_share = 2 * batches / micro_batches_per_cycle  # of the cycle's forward/backward work, an upper bound
    cycle_seconds = recipe.relora.restart_every * recipe.train.grad_accum_steps * tokens / 50_000
    # Like for like: a step's micro-batch does at least three matmuls of each target's size (forward, input
    # gradient, weight gradient), so a cycle on this machine takes at least this long.
    cycle_here = micro_batches_per_cycle * layers * sum(count * 3 * s["forward"]
                                                        for (_, count), s in zip(shapes.values(), per_shape.values()))
    all_shapes = [shape for (shape, count) in shapes.values() for _ in range(count * layers)]
    result = {"init_batches": batches, "tokens_per_micro_batch": tokens, "per_layer_seconds": per_shape,
              "sketch_seconds_per_restart": sketch_seconds, "passes_share_of_cycle": passes_share,
              "cycle_seconds_at_50k_tokens_per_s": cycle_seconds,
              "share_of_cycle": passes_share + sketch_seconds / cycle_seconds,
              "cycle_seconds_here_lower_bound": cycle_here,
              "share_of_cycle_here": passes_share + sketch_seconds / cycle_here,
              "sketch_bytes": sketch_bytes(all_shapes, rank)}
    console = Console(width=150)
    for name, s in per_shape.items():
        console.print(f"{name} {shapes[name][0]}: sketch update {s['range_pass']:.3f} s (range pass), "
                      f"{s['projection_pass']:.3f} s (projection pass) per micro-batch of {tokens} tokens; QR + SVD "
                      f"{s['qr_and_svd']:.3f} s")
    console.print(f"1.3B restart, init_batches = {batches}: sketch arithmetic {sketch_seconds:.1f} s on this machine "
                  f"({100 * sketch_seconds / cycle_seconds:.4f}% of a {cycle_seconds:,.0f} s cycle at 50k tokens/s), "
                  f"extra passes {2 * batches} of the cycle's {micro_batches_per_cycle:,} micro-batches "
                  f"({100 * passes_share:.4f}%): {100 * result['share_of_cycle']:.4f}% of a cycle in all; sketches "
                  f"hold {result['sketch_bytes'] / 2**20:,.0f} MiB during the init")
    console.print(f"like for like, the cycle's target matmuls on this machine (>= {cycle_here:,.0f} s): "
                  f"{100 * result['share_of_cycle_here']:.4f}% of a cycle")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
