"""The planner's choices for common cards, as the markdown table in README.md ("Which settings for which card").

    python bench/plan_table.py [--json results/plan_table.json]

Each row is `lean-relora memory-estimate RECIPE --set ... --gpu-gb FREE --plan` for a card of CARD GB, FREE being
what such a card has free beside a desktop (planner.card_free_gib: 24 GB -> 22.0 GiB). The 13B and 32B rows are
continued pretraining of those shapes with the 7B recipe's settings (model.* sizes given with --set: no model or
hub is needed). Takes several minutes on 2 CPU cores (a 7B trace is 15-30 s); prints each row as it comes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lean_relora.memory.estimate import GIB  # noqa: E402
from lean_relora.planner import card_free_gib, plan, plan_dict  # noqa: E402
from lean_relora.recipe import load_recipe  # noqa: E402

LLAMA2_13B = ["model.hidden_size=5120", "model.intermediate_size=13824", "model.num_layers=40", "model.num_heads=40",
              "model.vocab_size=32000"]
QWEN25_32B = ["model.hidden_size=5120", "model.intermediate_size=27648", "model.num_layers=64", "model.num_heads=40",
              "model.num_kv_heads=8", "model.vocab_size=152064"]
ROWS = ([("1.3B from scratch", "1b3_24gb.toml", [], card) for card in (8, 12, 16, 24)]
        + [("7B continued", "7b_8gb.toml", [], card) for card in (8, 12, 16, 24)]
        + [("13B LLaMA-2 shape, continued", "7b_8gb.toml", LLAMA2_13B, 12),
           ("32B Qwen2.5 shape, continued", "7b_8gb.toml", QWEN25_32B, 24)])


def row(label: str, recipe: str, sets: list[str], card: int) -> tuple[str, dict]:
    free = card_free_gib(card)
    started = time.perf_counter()
    result = plan(load_recipe(ROOT / "recipes" / recipe, sets), free)
    seconds = time.perf_counter() - started
    where = f"{card} GB ({free:g} GiB)"
    if result.chosen is None:
        c = result.closest
        cells = [label, where, f"nothing fits; closest: {c.settings.describe()}",
                 f"{c.need / GIB:.2f} ({(c.need - result.budget) / GIB:+.2f})", "-"]
    else:
        c = result.chosen
        needs = ", ".join(f"{n.split()[0]} {v / GIB:.2f}" for n, v in c.needs.items())
        cells = [label, where, c.settings.describe(), needs, f"{c.cost:.2f}"]
    return "| " + " | ".join(cells) + " |", {"label": label, "recipe": recipe, "sets": sets, "card_gb": card,
                                             "seconds": seconds, **plan_dict(result)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write every plan here")
    args = parser.parse_args()
    print("| model | card (GiB planned for) | settings | GPU need, GiB (by phase) | relative step time |")
    print("|---|---|---|---|---|")
    plans = []
    for spec in ROWS:
        line, record = row(*spec)
        print(line, flush=True)
        print(f"  ({record['traces']} traces, {record['seconds']:.0f} s)", file=sys.stderr, flush=True)
        plans.append(record)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plans, indent=1))


if __name__ == "__main__":
    main()
