"""Prepared token files: what `lean-relora prepare` writes and training memory-maps.

A prepared directory (data.source = "prepared:DIR") holds, per split ("train", "eval"):

    train.bin     every document's tokens, concatenated (BOS where the tokenizer has one, the text, EOS), as one flat
                  array of uint16 (vocabularies up to 65,536 tokens) or uint32
    train.idx     int64 document offsets into train.bin: documents + 1 entries, first 0, last the token count
    eval.bin, eval.idx   the held-out documents, the same way
    tokenizer/    the tokenizer that wrote them (a BPE is trained right here); a run copies it into its run dir
    manifest.json written last: the data settings it came from, the tokenizer and its hash, dtype and counts

Blocks are cut when training reads them (data.seq_len is not part of the files): block i of a split is tokens
[i * seq_len, (i + 1) * seq_len) of its flat array, the same rule the in-memory path applies to the same stream.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lean_relora.data.corpus import DOCUMENT_KEYS, DataError
from lean_relora.recipe import DataConfig

PREFIX = "prepared:"
FORMAT = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
# The recipe fields that decide which documents are prepared and how they are tokenized (not seq_len: blocks are cut
# when read).
DATA_KEYS = (*DOCUMENT_KEYS, "tokenizer", "bpe_vocab_size")


def is_prepared(cfg: DataConfig) -> bool:
    return cfg.source.startswith(PREFIX)


def prepared_dir(cfg: DataConfig) -> Path:
    return Path(cfg.source[len(PREFIX):]).expanduser()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenizer_hash(tok) -> str:
    """sha256 of everything that decides the ids: the fast tokenizer's serialized model, and its BOS/EOS."""
    model = tok.backend_tokenizer.to_str() if tok.is_fast else json.dumps(sorted(tok.get_vocab().items()))
    text = model + json.dumps([tok.bos_token, tok.eos_token])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class TokenSplit:
    """One split, memory-mapped: nothing is read until a block is asked for, and then only from the page cache."""

    tokens: np.ndarray  # flat, read-only memmap
    offsets: np.ndarray  # int64, documents + 1

    def blocks(self, seq_len: int) -> np.ndarray:
        """[n, seq_len] zero-copy view of the whole blocks; the tail that fills no block is left out."""
        n = len(self.tokens) // seq_len
        return self.tokens[: n * seq_len].reshape(n, seq_len)


@dataclass
class Prepared:
    directory: Path
    manifest: dict
    train: TokenSplit
    eval: TokenSplit


def read_manifest(directory: Path, source: str) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        partial = any(Path(directory).parent.glob(f".{Path(directory).name}.partial*"))
        hint = " (a preparation of it was interrupted)" if partial else ""
        raise DataError(f"data.source = '{source}': {directory} is not a prepared data directory ({MANIFEST} "
                        f"missing){hint}; run lean-relora prepare RECIPE --out {directory}")
    try:
        manifest = json.loads(path.read_text())
        usable = (manifest["format"] == FORMAT and set(SPLITS) <= set(manifest["splits"]) and "data" in manifest
                  and "tokenizer" in manifest)
    except (ValueError, KeyError, TypeError):
        usable = False
    if not usable:
        raise DataError(f"data.source = '{source}': {path} is damaged or of another format; prepare it again")
    return manifest


def open_prepared(cfg: DataConfig) -> Prepared:
    """The memory-mapped splits of cfg's prepared directory; DataError if it is missing, partial or damaged."""
    directory = prepared_dir(cfg)
    manifest = read_manifest(directory, cfg.source)
    dtype = np.dtype(manifest["dtype"])
    splits = {}
    for split in SPLITS:
        counts = manifest["splits"][split]
        files = {directory / f"{split}.bin": (counts["tokens"], dtype), directory / f"{split}.idx":
                 (counts["documents"] + 1, np.dtype(np.int64))}
        for path, (count, kind) in files.items():
            size = path.stat().st_size if path.is_file() else -1
            if size != count * kind.itemsize:
                found = "missing" if size < 0 else f"{size} bytes, the manifest says {count * kind.itemsize}"
                raise DataError(f"data.source = '{cfg.source}': {path} is {found}; prepare it again")
        tokens, offsets = (np.memmap(p, dtype=k, mode="r", shape=(c,)) if c else np.zeros(0, k)
                           for p, (c, k) in files.items())
        splits[split] = TokenSplit(tokens, offsets)
    return Prepared(directory, manifest, **splits)


def check_matches(prepared: Prepared, cfg: DataConfig, name: str) -> None:
    """DataError (one line) unless the recipe names the tokenizer the files were written with (`name`: what
    data.tokenizer stands for, tokenizer.tokenizer_name)."""
    where = f"data.source = '{cfg.source}'"
    if prepared.manifest["tokenizer"] != name:
        raise DataError(f"{where}: prepared with tokenizer '{prepared.manifest['tokenizer']}', the recipe's is "
                        f"'{name}'; set data.tokenizer to match or prepare again with this recipe")
    made = prepared.manifest["data"]["bpe_vocab_size"]
    if name == "bpe" and made != cfg.bpe_vocab_size:
        raise DataError(f"{where}: prepared with data.bpe_vocab_size = {made}, the recipe says {cfg.bpe_vocab_size}; "
                        "set it to match or prepare again with this recipe")


def check_tokenizer(prepared: Prepared, cfg: DataConfig, tok) -> None:
    """DataError (one line) unless `tok` is, by its hash, the tokenizer the files were written with."""
    digest = tokenizer_hash(tok)
    if digest != prepared.manifest["tokenizer_sha256"]:
        raise DataError(f"data.source = '{cfg.source}': the tokenizer in use (sha256 {digest[:12]}) is not the one the "
                        f"files were written with ({prepared.manifest['tokenizer_sha256'][:12]}); prepare again or "
                        "use that tokenizer")


def document_ids(tok, texts: list[str]) -> list[list[int]]:
    """The token ids of each document as it is packed: BOS (where the tokenizer defines one, as LLaMA-style models
    were pretrained), the text, EOS. A tokenizer without BOS (the trained BPE, GPT-2, T5) gets EOS alone, which then
    also marks where the next document begins. The one rule for every reader and the writer."""
    if tok.is_fast:  # the Rust batch call itself: no offsets or Python objects per token
        ids = (e.ids for e in tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False))
    else:
        ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    head = [] if tok.bos_token_id is None else [tok.bos_token_id]
    eos = [tok.eos_token_id]
    return [head + x + eos for x in ids]
