"""Preflight: in about a minute, does lean-relora run on this machine at all? The first stage of bench/gpu_run.sh, so
that a short GPU window finds a broken install before it spends minutes measuring.

Checks, each caught on its own (what it found is kept beside its error) and written to OUT/preflight.json as soon as
it ends:
  imports: the version of every package lean-relora and the benchmarks use (a missing peft is noted, not a failure),
           which lean_relora is imported, and which bitsandbytes native library was loaded (its CUDA build or none);
  step:    the tiny recipe's ReLoRA phase on --device (nf4 base, paged 8-bit AdamW on CUDA), on random tokens: one
           training step, one restart (merge every layer, requantize, reset the optimizer state), one more step;
           the losses, the merge's seconds and retention, and on CUDA the peak memory.

    python bench/preflight.py [--device cuda|cpu] [--out DIR]

Exit code 1 if a check failed.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # check the checkout this script is in, not whichever lean_relora is installed
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from json_out import write_json  # noqa: E402

REQUIRED = ("torch", "bitsandbytes", "transformers", "tokenizers", "huggingface_hub", "safetensors", "datasets",
            "rich", "typer", "lean_relora")
OPTIONAL = ("peft", "accelerate", "pytest")  # the benchmark's peer and the test runner


def metadata_version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:  # lean_relora from the checkout, not installed
        return None


def imports(device: str, out: dict) -> None:
    out.update(python=platform.python_version(), executable=sys.executable)
    missing = []
    for name in REQUIRED + OPTIONAL:
        try:
            module = importlib.import_module(name)
            out[name] = getattr(module, "__version__", None) or metadata_version(name)
        except Exception as error:
            out[name] = f"unavailable: {type(error).__name__}: {error}"
            if name in REQUIRED:
                missing.append(name)
    import torch

    import lean_relora
    out["lean_relora"] = str(Path(lean_relora.__file__).parent)
    out["cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    try:
        from bitsandbytes import cextension
        out["bnb_backend"] = cextension.BNB_BACKEND
        out["bnb_library"] = type(cextension.lib).__name__
        out["bnb_library_file"] = getattr(getattr(cextension.lib, "_lib", None), "_name", None)
    except Exception as error:
        out["bnb_library"] = f"unavailable: {type(error).__name__}: {error}"
    if missing:
        raise ImportError(f"missing: {', '.join(missing)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    if device == "cuda" and out.get("bnb_library") != "CudaBNBNativeLibrary":
        raise RuntimeError(f"bitsandbytes loaded no CUDA library ({out.get('bnb_library')})")


def step(device: str, out: dict) -> None:
    from dataclasses import replace

    import torch

    from lean_relora.memory.analytic import recipe_vocab_size
    from lean_relora.memory.measure import relora_run
    from lean_relora.recipe import load_recipe
    from lean_relora.training.restart import restart
    from lean_relora.training.step import train_step

    recipe = load_recipe(ROOT / "recipes" / "tiny_cpu.toml")
    recipe = replace(recipe, train=replace(recipe.train, device=device))
    start = time.perf_counter()
    run = relora_run(recipe, recipe_vocab_size(recipe), torch.device(device))
    built = time.perf_counter() - start
    first = train_step(run)
    record = restart(run)
    second = train_step(run)
    out.update(quant=recipe.lora.quant, optimizer=type(run.optimizer).__name__, build_seconds=built,
               loss_before_restart=first, loss_after_restart=second, merge_seconds=record["merge_seconds"],
               retention=record["retention"], seconds=time.perf_counter() - start)
    if device == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    if not (math.isfinite(first) and math.isfinite(second)):
        raise RuntimeError(f"non-finite loss: {first} before the restart, {second} after")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_run")
    args = parser.parse_args(argv)
    report, started, path = {"device": args.device}, time.perf_counter(), args.out / "preflight.json"
    for name, check in (("imports", imports), ("step", step)):
        begun, record = time.perf_counter(), {"status": "running"}
        report[name] = record
        write_json(path, report)
        try:
            check(args.device, record)  # fills `record` as it goes: what it found stays beside a failure
            record["status"] = "ok"
        except Exception as error:
            record.update(status="failed", error=f"{type(error).__name__}: {error}",
                          traceback=traceback.format_exc())
        report[name]["check_seconds"] = time.perf_counter() - begun
        report["seconds"] = time.perf_counter() - started
        write_json(path, report)
        print(f"preflight {name}: {report[name]['status']}"
              + (f" ({report[name]['error']})" if "error" in report[name] else ""), flush=True)
    print(f"preflight: {report['seconds']:.0f} s; wrote {path}", flush=True)
    return 1 if any(report[n]["status"] == "failed" for n in ("imports", "step")) else 0


if __name__ == "__main__":
    sys.exit(main())
