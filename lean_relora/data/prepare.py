"""`lean-relora prepare`: tokenize a recipe's documents once into the memory-mapped files of token_files.py.

Everything is written into `.DIR.partial` beside DIR, fsynced, the manifest last, and only then renamed to DIR, so a
directory with a manifest is always complete. After every batch of documents the partial directory's progress.json
records how far each split is written (fsynced files first); an interrupted preparation is continued from there by
the next `prepare` of the same settings (the bytes past that point are cut off), and replaced by one of other
settings.

Tokenizing is the fast tokenizer's batch API (Rust, on every core, outside the GIL); the main thread only turns ids
into a flat array and appends it to the file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from itertools import chain, islice
from pathlib import Path

import datasets
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lean_relora.data.corpus import DataError, load_documents
from lean_relora.data.token_files import (
    DATA_KEYS,
    FORMAT,
    MANIFEST,
    SPLITS,
    document_ids,
    is_prepared,
    read_manifest,
    token_dtype,
    tokenizer_hash,
)
from lean_relora.data.tokenizer import load_tokenizer, tokenizer_name
from lean_relora.durable import sync_dir, write_synced
from lean_relora.recipe import DataConfig

BATCH_DOCUMENTS = 1000  # documents per tokenizer call: enough for every core, little memory
PROGRESS = "progress.json"  # in the partial directory: how far each split is written (what a rerun continues from)


def prepare_data(cfg: DataConfig, out: Path, max_tokens: int = 0, console: Console | None = None,
                 pretrained: str = "") -> dict:
    """Tokenize cfg's train and held-out documents into `out`; returns the manifest. A complete `out` made from the
    same settings is returned as it is; one made from other settings, or any other non-empty directory, is refused
    (DataError), never overwritten. max_tokens > 0 stops the train split at the first document end past that many
    tokens (a hub stream has no end of its own). `pretrained` (model.pretrained) names the tokenizer data.tokenizer =
    "" stands for."""
    if is_prepared(cfg):
        raise DataError(f"data.source = '{cfg.source}': is prepared already; prepare the recipe that names the "
                        "original source")
    if max_tokens < 0:
        raise DataError(f"--max-tokens {max_tokens}: must be >= 0 (0 = every document)")
    out = Path(out)
    want = {k: getattr(cfg, k) for k in DATA_KEYS}
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out, str(out))
        if manifest["data"] == want and manifest["max_tokens"] == max_tokens:
            return manifest
        changed = sorted(k for k in want if manifest["data"].get(k) != want[k])
        changed += ["max_tokens"] if manifest["max_tokens"] != max_tokens else []
        raise DataError(f"--out {out}: holds data prepared with other {', '.join(changed)}; choose another --out "
                        "or delete that directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out}: exists and is not a prepared data directory; choose a new one")
    started = time.perf_counter()
    train_docs, eval_docs = load_documents(cfg)
    partial = out.parent / f".{out.name}.partial"
    state = _read_progress(partial, want, max_tokens)
    if state is None:  # nothing to continue: what an interrupted run of other settings left goes
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    # Saved in partial/tokenizer (a BPE is trained there), or found there when continuing with the same settings.
    tok = load_tokenizer(cfg, partial, train_docs, pretrained)
    if state is not None and state.get("tokenizer_sha256") != tokenizer_hash(tok):
        state = None  # a pretrained tokenizer changed under its name: the files written with it are redone
    state = state or {"data": want, "max_tokens": max_tokens, "tokenizer_sha256": tokenizer_hash(tok)}
    continued = {split: state[split]["documents"] for split in SPLITS if split in state}
    dtype = token_dtype(len(tok))

    def save(split: str, position: dict) -> None:
        state[split] = position
        write_synced(partial / f"{PROGRESS}.tmp", json.dumps(state).encode())
        os.replace(partial / f"{PROGRESS}.tmp", partial / PROGRESS)

    with _progress(console) as progress:
        splits = {split: _write_split(docs, tok, partial / split, dtype, limit, progress, state.get(split),
                                      lambda position, split=split: save(split, position))
                  for split, docs, limit in (("eval", eval_docs, 0), ("train", train_docs, max_tokens))}
    if splits["train"]["tokens"] == 0 or splits["eval"]["tokens"] == 0:
        raise DataError(f"data.source = '{cfg.source}': a split has no tokens; give more data")
    manifest = {"format": FORMAT, "data": want, "max_tokens": max_tokens,
                "tokenizer": tokenizer_name(cfg, pretrained), "tokenizer_sha256": tokenizer_hash(tok),
                "vocab_size": len(tok), "dtype": dtype.name, "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id, "splits": splits, "continued_from_documents": continued,
                "seconds": round(time.perf_counter() - started, 3),
                "versions": {"datasets": datasets.__version__}}
    (partial / PROGRESS).unlink()
    write_synced(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
    sync_dir(partial)
    if out.exists():
        out.rmdir()  # empty, checked above
    os.rename(partial, out)
    sync_dir(out.parent)
    return manifest


def _read_progress(partial: Path, want: dict, max_tokens: int) -> dict | None:
    """What an interrupted preparation of the same settings saved, or None."""
    try:
        state = json.loads((partial / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    return state if state.get("data") == want and state.get("max_tokens") == max_tokens else None


def _write_split(docs, tok, stem: Path, dtype: np.dtype, max_tokens: int, progress, start: dict | None,
                 save) -> dict:
    """Append docs' tokens to stem.bin/.idx from `start` (what a previous run saved) on; after every batch of
    documents the files are fsynced and `save` records the position, so a kill loses at most that batch."""
    if start is not None and start["done"]:
        return start["counts"]
    streaming = isinstance(docs, datasets.IterableDataset)
    documents, tokens = (start["documents"], start["tokens"]) if start else (0, 0)
    total = (max_tokens or None) if streaming else len(docs)
    task = progress.add_task(f"tokenize {stem.name}", total=total, completed=tokens if streaming else documents,
                             tokens=f"{tokens:,}", speed="-")
    bin_path, idx_path = stem.with_suffix(".bin"), stem.with_suffix(".idx")
    if start is None:
        bin_path.write_bytes(b"")
        idx_path.write_bytes(np.zeros(1, np.int64).tobytes())
    else:  # what was written after the last saved position goes
        os.truncate(bin_path, tokens * dtype.itemsize)
        os.truncate(idx_path, (documents + 1) * 8)
        if streaming:
            docs.load_state_dict(start["stream"])
        else:
            docs = docs.select(range(documents, len(docs)))
    started, first = time.perf_counter(), tokens
    with open(bin_path, "ab") as ids_file, open(idx_path, "ab") as idx_file:
        for texts, stream_state in _batches(docs, streaming):
            ids = document_ids(tok, texts)
            ends = tokens + np.cumsum(np.fromiter(map(len, ids), np.int64, len(ids)))
            if max_tokens and ends[-1] >= max_tokens:
                keep = int(np.searchsorted(ends, max_tokens)) + 1  # up to the first document end at or past it
                ids, ends = ids[:keep], ends[:keep]
            ids_file.write(np.fromiter(chain.from_iterable(ids), dtype, int(ends[-1] - tokens)).tobytes())
            idx_file.write(ends.tobytes())
            documents, tokens = documents + len(ids), int(ends[-1])
            for f in (ids_file, idx_file):
                f.flush()
                os.fsync(f.fileno())
            save({"documents": documents, "tokens": tokens, "stream": stream_state, "done": False})
            speed = (tokens - first) / max(time.perf_counter() - started, 1e-9)
            progress.update(task, completed=tokens if streaming else documents, tokens=f"{tokens:,}",
                            speed=f"{speed:,.0f}")
            if max_tokens and tokens >= max_tokens:
                break
    counts = {"documents": documents, "tokens": tokens,
              "tokens_per_s": round((tokens - first) / max(time.perf_counter() - started, 1e-9))}
    save({"documents": documents, "tokens": tokens, "done": True, "counts": counts})
    return counts


def _batches(docs, streaming: bool):
    """(texts, the stream's position after them) per batch of documents; a Dataset's position is its offset."""
    if not streaming:
        for batch in docs.iter(batch_size=BATCH_DOCUMENTS):
            yield batch["text"], None
        return
    iterator = iter(docs)
    while texts := [ex["text"] for ex in islice(iterator, BATCH_DOCUMENTS)]:
        yield texts, docs.state_dict()


def _progress(console: Console | None) -> Progress:
    console = console or Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[tokens]} tokens, {task.fields[speed]} tokens/s"), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not console.is_terminal)
