"""Checkpoints: the whole training state, written atomically, verified before it is used.

Layout, defined here once (RUN_DIR/checkpoints/):

    step-00000120/         one complete checkpoint, named by its optimizer step
      model.safetensors    model.state_dict(): full-rank weights, LoRA factors, the stored base (4-bit codes or int8
                           codes and row absmax, bias)
      base.safetensors     per frozen base "<module>.<key>": bnb quant state, fp32 master copy, retention probe
      state.safetensors    "optimizer.<param index>.<key>" (8-bit codes, absmax, qmaps or fp32 moments) and "rng.*"
      state.json           counters (TrainState; data position = micro_batches), python/numpy RNG, optimizer scalars,
                           the number of ranks that trained
      config.json          the Hugging Face model config (export and eval rebuild the model from it)
      masters/<layer>.f32  with relora.master = "disk": each layer's fp32 master as of this step, a hard link to the
                           run's immutable file of that merge generation (model/master.py), so no 28 GB copy per save;
                           with several ranks (distributed.py) RAM masters too, each written by its owner
      recipe.toml          the recipe that made it (load_recipe reads it back; meta.json holds its digest)
      meta.json            written last: format, step, digest, library versions, bytes and sha256 of every other file
    latest                 the name of the newest complete checkpoint

The learning rate schedule is a function of the step and the recipe, so the step is its whole state. A save writes
into `.tmp-<name>-<pid>` beside the others, fsyncs every file and the directory, renames it into place, then replaces
`latest` (temporary file + rename); only then are checkpoints beyond `keep_last` removed. A crash at any moment leaves
every complete checkpoint and a `latest` naming one of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import re
import shutil
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, PretrainedConfig

from lean_relora.durable import file_sha256, sync_dir, write_synced, write_text
from lean_relora.model.frozen_base import FrozenBase
from lean_relora.model.master import DiskMaster, link_or_copy
from lean_relora.model.streamed import StateMismatch, TensorSource, load_state
from lean_relora.recipe import Recipe, load_recipe
from lean_relora.training.optim import load_optimizer_state, optimizer_state
from lean_relora.training.run import Run

FORMAT = 1
CHECKPOINTS, LATEST = "checkpoints", "latest"
MODEL, BASE, TENSORS, STATE = "model.safetensors", "base.safetensors", "state.safetensors", "state.json"
CONFIG, RECIPE, META = "config.json", "recipe.toml", "meta.json"
OPTIMIZER_KEY, RNG_KEY = "optimizer.", "rng."  # key prefixes in state.safetensors
# In a checkpoint: the disk masters of the checkpoint's merge generation, hard-linked as masters/<layer>.f32
CHECKPOINT_MASTERS = "masters"
NAME = re.compile(r"step-(\d{8,})")
LIBRARIES = ("lean-relora", "torch", "bitsandbytes", "transformers", "safetensors", "datasets", "numpy")


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged or does not fit; the message is one line for the user."""


class CheckpointSaveError(Exception):
    """A save failed (disk full, I/O error); the previous checkpoint is untouched."""


# ----------------------------------------------------------------------------------------------- save


def save(run: Run, run_dir: Path, keep_last: int) -> Path:
    """Write the run's whole state as checkpoints/step-<step>, atomically; prune to keep_last. Returns its path.
    With several ranks every rank calls it: rank 0 writes the replicated state and meta.json, each rank the masters
    it owns, all into one directory that rank 0 renames into place once every rank's files are synced."""
    ranks = run.ranks
    root = Path(run_dir) / CHECKPOINTS
    name = f"step-{run.state.step:08d}"
    tmp, final = root / f".tmp-{name}-{ranks.broadcast(os.getpid())}", root / name
    if run.device.type == "cuda":
        torch.cuda.synchronize()  # paged optimizer state is written asynchronously
    error = None
    if ranks.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for leftover in [*root.glob(".tmp-*"), *root.glob(".trash-*")]:  # from a save or prune that was killed
                shutil.rmtree(leftover, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = _why(e)
    error = ranks.broadcast(error)
    files = {}
    if error is None:
        try:
            for file, write in _writers(run):
                files[file] = write(tmp / file) or _sync(tmp / file)  # a linked master brings its own size and digest
        except (OSError, SafetensorError) as e:
            error = _why(e)
    shares = ranks.gather((files, error))
    error = next((e for _, e in shares if e is not None), None)
    if ranks.is_main and error is None:
        try:
            files = {file: entry for share, _ in shares for file, entry in share.items()}
            meta = {"format": FORMAT, "step": run.state.step,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "recipe_digest": run.recipe.digest(), "versions": _versions(), "files": files}
            write_text(tmp / META, json.dumps(meta, indent=1))
            sync_dir(tmp)
            # the other ranks' master files (none in a warm start)
            if ranks.several and (tmp / CHECKPOINT_MASTERS).is_dir():
                sync_dir(tmp / CHECKPOINT_MASTERS)
            if final.exists():  # a checkpoint of an abandoned continuation: set aside, never overwritten
                final.rename(root / f"{name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(tmp, final)
            sync_dir(root)
            write_text(root / f"{LATEST}.tmp", name + "\n")
            os.replace(root / f"{LATEST}.tmp", root / LATEST)
            sync_dir(root)
        except (OSError, SafetensorError) as e:
            error = _why(e)
    error = ranks.broadcast(error)
    if error is not None:
        if ranks.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = _pointer(root)
        kept = f"the previous checkpoint {root / previous} is intact" if previous else "there is no earlier checkpoint"
        raise CheckpointSaveError(f"checkpoint {name} could not be written to {root} ({error}); {kept}; "
                                  "free disk space, then resume with --resume auto")
    if ranks.is_main:
        _prune(root, keep_last, run.state.step)
    return final


def _why(error: Exception) -> str:
    return getattr(error, "strerror", None) or re.sub(r"^.*I/O error: ", "", str(error).splitlines()[0])


def _writers(run: Run):
    """(file, write) of what this process writes: everything for one process; with several ranks, rank 0 the
    replicated state and each rank the masters of the layers it owns (as masters/<layer>.f32, RAM or disk alike)."""
    ranks = run.ranks
    modules = [(n, m) for n, m in run.model.named_modules() if isinstance(m, FrozenBase)]
    if ranks.is_main:
        opt_tensors, opt_params = optimizer_state(run.optimizer)
        rng_tensors, rng_json = _rng_state(run)
        state = {"train_state": dataclasses.asdict(run.state), "relora": bool(modules),
                 "masters": any(m.master is not None for _, m in modules)
                 or (ranks.several and run.recipe.keeps_master),
                 "optimizer": opt_params, "rng": rng_json, "ranks": ranks.size}
        bases = {f"{n}.{k}": v for n, m in modules for k, v in m.extra_state(with_master=not ranks.several).items()}
        yield MODEL, lambda path: save_file(_plain(run.model.state_dict()), path)
        yield BASE, lambda path: save_file(_plain(bases), path)
        yield TENSORS, lambda path: save_file(_plain({**{OPTIMIZER_KEY + k: v for k, v in opt_tensors.items()},
                                                      **rng_tensors}), path)
        yield STATE, lambda path: write_text(path, json.dumps(state))
        yield CONFIG, lambda path: write_text(path, run.model.config.to_json_string())
        yield RECIPE, lambda path: write_text(path, run.recipe.to_toml())
    for name, module in modules:
        if module.master is not None and not module.master.in_memory:
            yield f"{CHECKPOINT_MASTERS}/{name}.f32", lambda path, master=module.master: _link_master(master, path)
        elif module.master is not None and ranks.several:
            yield f"{CHECKPOINT_MASTERS}/{name}.f32", lambda path, master=module.master: _write_master(master, path)


def _write_master(master, path: Path) -> None:
    """A RAM master as a raw fp32 file, the format of a disk master, which any rank count can load back."""
    path.parent.mkdir(exist_ok=True)
    write_synced(path, memoryview(master.read().contiguous().numpy()).cast("B"))


def _link_master(master: DiskMaster, path: Path) -> dict:
    """A disk master enters a checkpoint as a hard link to its immutable file: no copy, and no re-hash (the digest
    was taken when the file was written)."""
    path.parent.mkdir(exist_ok=True)
    link_or_copy(master.path, path)
    sync_dir(path.parent)
    return {"bytes": master.nbytes, "sha256": master.sha256}


def _plain(tensors: dict) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two sharing storage (tied embeddings, shared maps): what safetensors accepts."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _rng_state(run: Run) -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    tensors = {RNG_KEY + "torch": torch.get_rng_state(), RNG_KEY + "generator": run.generator.get_state(),
               RNG_KEY + "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"{RNG_KEY}cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": random.getstate(), "numpy": [np_state[0], *np_state[2:]]}


def _sync(path: Path) -> dict:
    """fsync a written file and describe it for meta.json."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path, sync=True)}


def _prune(root: Path, keep_last: int, step: int) -> None:
    """Remove the oldest checkpoints before `step` so that keep_last remain (later-numbered ones, left by a resume
    from an older checkpoint, are not this run's to delete). Renamed first so a half-deleted one is never read."""
    older = [p for p in listed(root) if step_of(p) < step]
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        trash = root / f".trash-{path.name}"
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ----------------------------------------------------------------------------------------------- find and verify


def verify(path: Path, checksums: bool = True) -> dict:
    """meta.json of a complete, intact checkpoint; CheckpointError naming the first problem otherwise.
    checksums=False checks presence and sizes only (cheap: for picking a recipe, not for loading)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    try:
        meta = json.loads((path / META).read_text())
        files = {file: (int(want["bytes"]), str(want["sha256"])) for file, want in meta["files"].items()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete checkpoint ({META} missing)") from None
    except (ValueError, OSError, LookupError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: {META} is unreadable or malformed ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    unlisted = sorted({MODEL, BASE, TENSORS, STATE, CONFIG, RECIPE} - set(files))
    if unlisted:
        raise CheckpointError(f"{path}: {META} does not list {', '.join(unlisted)}")
    for file, (want, sha256) in files.items():
        if not (path / file).is_file():
            raise CheckpointError(f"{path}: {file} is missing")
        size = (path / file).stat().st_size
        if size != want:
            raise CheckpointError(f"{path}: {file} is " + (f"truncated ({size} of {want} bytes)" if size < want
                                                            else f"{size} bytes, {META} says {want}"))
        if checksums and _sync(path / file)["sha256"] != sha256:
            raise CheckpointError(f"{path}: {file} is corrupted (sha256 differs from {META})")
    return meta


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint found and verified once: where it is and what its meta.json, state.json and recipe say. Every
    reader of a resumed or exported checkpoint takes this value instead of parsing the files again."""

    path: Path
    meta: dict  # meta.json: format, versions, every file's size and sha256
    state: dict  # state.json: counters, optimizer hyper-parameters, RNG states, relora and masters flags, ranks
    recipe: Recipe  # recipe.toml
    problems: tuple[str, ...] = ()  # newer checkpoints skipped as damaged on the way to this one
    checksummed: bool = True  # False: sizes checked, contents not (enough to pick a recipe, not to load)

    @classmethod
    def read(cls, path: Path, checksums: bool = True, problems: tuple[str, ...] = ()) -> Checkpoint:
        path = Path(path)
        meta = verify(path, checksums)
        return cls(path, meta, read_state(path), saved_recipe(path), tuple(problems), checksums)

    @property
    def step(self) -> int:
        return self.state["train_state"]["step"]

    @property
    def ranks(self) -> int:
        return self.state.get("ranks", 1)

    @property
    def past_warm_start(self) -> bool:
        """Whether the model holds ReLoRA layers (false: a dense model, saved during the full-rank warm start)."""
        return self.state["relora"]


def find_latest(run_dir: Path, checksums: bool = True) -> tuple[Path, list[str]]:
    """The newest intact checkpoint of a run (the one `latest` names, else by step) and the problems of any newer
    ones that were skipped."""
    root = Path(run_dir) / CHECKPOINTS
    paths = listed(root)[::-1]
    pointer = _pointer(root)
    paths.sort(key=lambda p: p.name != pointer)  # stable: the pointed-to first, then newest first
    problems = []
    for path in paths:
        try:
            verify(path, checksums)
            return path, problems
        except CheckpointError as e:
            problems.append(str(e))
    found = f" ({'; '.join(problems)})" if problems else ""
    raise CheckpointError(f"{run_dir}: no complete checkpoint in {root}{found}")


def resolve(spec: str | Path | Checkpoint, run_dir: Path | None = None, checksums: bool = True) -> Checkpoint:
    """`auto` (the newest intact checkpoint of run_dir), a run directory (the same), or a checkpoint directory
    (verified, no fallback: it was asked for by name). A Checkpoint already resolved is returned as it is, unless
    its contents were not checksummed and `checksums` asks for that."""
    if isinstance(spec, Checkpoint):
        return spec if spec.checksummed or not checksums else Checkpoint.read(spec.path, True, spec.problems)
    if str(spec) == "auto":
        if run_dir is None:
            raise CheckpointError("--resume auto: needs the run directory (--run-dir) whose checkpoints to continue")
        return Checkpoint.read(*_latest(run_dir, checksums))
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if (path / META).exists() or NAME.fullmatch(path.name):
        return Checkpoint.read(path, checksums)
    if (path / CHECKPOINTS).is_dir():
        return Checkpoint.read(*_latest(path, checksums))
    raise CheckpointError(f"{path}: neither a checkpoint ({META}) nor a run directory ({CHECKPOINTS}/)")


def _latest(run_dir: Path, checksums: bool) -> tuple[Path, bool, tuple[str, ...]]:
    path, problems = find_latest(run_dir, checksums)
    return path, checksums, tuple(problems)


def _pointer(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def step_of(path: Path) -> int:
    """The optimizer step a checkpoint directory is named for."""
    return int(NAME.fullmatch(path.name).group(1))


def listed(root: Path) -> list[Path]:
    """The checkpoint directories in `root` (RUN_DIR/checkpoints), oldest first, intact or not."""
    return sorted((p for p in root.iterdir() if NAME.fullmatch(p.name)), key=step_of) if root.is_dir() else []


# ----------------------------------------------------------------------------------------------- load


def saved_recipe(path: Path) -> Recipe:
    return load_recipe(Path(path) / RECIPE)


def saved_config(path: Path) -> PretrainedConfig:
    """The Hugging Face config of the checkpoint's model: with the weights, all that rebuilding it needs."""
    return AutoConfig.from_pretrained(path)


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE).read_text())


def load_model_state(model: torch.nn.Module, found: Checkpoint) -> None:
    """Weights, LoRA factors and the stored base (buffers, quant states, masters, probes) into a model of the same
    structure."""
    path = found.path
    try:
        load_state(model, TensorSource(path, MODEL))
    except StateMismatch as e:
        why = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: does not fit the model the recipe builds ({why})") from None
    bases = TensorSource(path, BASE)  # read a layer at a time: with masters in RAM the file is 4 bytes per weight
    meta, generation = found.meta, found.state["train_state"]["restarts"]
    stores = {}
    for name, module in model.named_modules():
        if isinstance(module, FrozenBase):
            prefix, file = f"{name}.", f"{CHECKPOINT_MASTERS}/{name}.f32"
            module.load_extra_state({k[len(prefix):]: bases.get(k) for k in bases.files if k.startswith(prefix)},
                                    Path(path) / file if file in meta["files"] else None, generation,
                                    meta["files"].get(file, {}).get("sha256", ""))
            if isinstance(module.master, DiskMaster):
                stores[id(module.master.store)] = module.master.store
    for store in stores.values():  # generations written after this checkpoint (by a killed run) are not ours
        store.collect()


def restore(run: Run, found: Checkpoint) -> None:
    """Load a checkpoint into a run built from its recipe (setup, plus start_relora if the checkpoint is past the
    warm start): model, optimizer, counters and every RNG, so that training continues bit for bit."""
    path, state = found.path, found.state
    load_model_state(run.model, found)
    tensors = load_file(Path(path) / TENSORS)
    try:
        load_optimizer_state(run.optimizer, {k[len(OPTIMIZER_KEY):]: v for k, v in tensors.items()
                                             if k.startswith(OPTIMIZER_KEY)}, state["optimizer"])
    except ValueError as e:
        raise CheckpointError(f"{path}: optimizer state does not fit ({e})") from None
    for key, value in state["train_state"].items():
        if hasattr(run.state, key):
            setattr(run.state, key, value)
    run.state.eval_losses = [tuple(x) for x in run.state.eval_losses]
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((name, tensors[RNG_KEY + "numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors[RNG_KEY + "torch"])
    run.generator.set_state(tensors[RNG_KEY + "generator"])
    cuda = [tensors[f"{RNG_KEY}cuda.{i}"] for i in range(sum(k.startswith(RNG_KEY + "cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
