"""Data: fixed-length token blocks of the train and held-out documents (corpus.py), encoded with the run's tokenizer
(tokenizer.py).

Tokenizing and caching are left to Hugging Face `datasets`; this module packs token streams into blocks and fixes the
order in which blocks are served. That order is a pure function of (shuffle_seed, micro-batch index), so resuming a
run needs nothing but the index.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from transformers import PreTrainedTokenizerFast

from lean_relora.corpus import DataError, load_documents
from lean_relora.recipe import DataConfig
from lean_relora.tokenizer import load_tokenizer

_INT32_IDS = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})  # half int64's RAM


def _tokenize_fn(tok):
    eos = tok.eos_token_id

    def tokenize(batch):
        ids = tok(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]  # no BOS: EOS alone separates
        return {"input_ids": [x + [eos] for x in ids]}

    return tokenize


def _pack(docs: datasets.Dataset, tok, seq_len: int) -> tuple[torch.Tensor, int]:
    """Blocks [n, seq_len] (int32) of the documents' concatenated tokens, and the token count before cutting."""
    tokenized = docs.map(_tokenize_fn(tok), batched=True, remove_columns=docs.column_names, features=_INT32_IDS)
    flat = pc.list_flatten(tokenized.data.column("input_ids")).to_numpy()
    n = len(flat) // seq_len  # the tail that does not fill a block is dropped
    kept = flat[: n * seq_len]
    kept = kept if kept.flags.writeable else kept.copy()  # zero-copy Arrow memory is read-only; torch wants to own it
    return torch.from_numpy(kept).view(n, seq_len), len(flat)


def _too_small(cfg: DataConfig, split: str, tokens: int, streaming: bool) -> DataError:
    knob = "data.eval_documents" if streaming else "data.eval_fraction"
    fix = f"lower data.seq_len or {knob}" if split == "train" else f"lower data.seq_len, raise {knob}"
    return DataError(
        f"data.seq_len = {cfg.seq_len}: the {split} split has only {tokens} tokens, fewer than one block; {fix}, "
        "or give more data"
    )


class PackedData:
    """Token blocks of cfg.seq_len for training and evaluation."""

    def __init__(self, train_blocks: torch.Tensor | None, eval_blocks: torch.Tensor, seed: int, vocab_size: int):
        self.vocab_size = vocab_size
        self.seq_len = eval_blocks.shape[1]
        self._train, self._eval = train_blocks, eval_blocks
        self._seed = seed % 2**63  # SeedSequence wants a non-negative entropy
        self._orders: dict[int, np.ndarray] = {}
        self.num_eval_blocks = len(eval_blocks)
        self.num_train_blocks = None if train_blocks is None else len(train_blocks)
        self.train_tokens = None if train_blocks is None else self.num_train_blocks * self.seq_len

    def train_batch(self, index: int, batch_size: int) -> torch.LongTensor:
        """The index-th micro-batch, [batch_size, seq_len]: a function of (seed, index, batch_size) alone."""
        n = self.num_train_blocks
        epoch, offset = np.divmod(np.arange(index * batch_size, (index + 1) * batch_size), n)
        rows = np.empty_like(offset)
        for e in np.unique(epoch):  # a batch may straddle an epoch boundary
            rows[epoch == e] = self._order(int(e))[offset[epoch == e]]
        return self._train[torch.from_numpy(rows)].long()

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 4:  # only the current and the next epoch are ever hot
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self._seed, epoch]).permutation(self.num_train_blocks)
        return self._orders[epoch]

    def eval_batches(self, batch_size: int, max_batches: int) -> list[torch.LongTensor]:
        """Up to max_batches full batches of eval blocks, the same every call.

        Batches are never ragged (so a plain mean of batch losses is exact), unless there are fewer eval blocks than
        batch_size: then the single batch holds them all.
        """
        usable = max(min(max_batches, len(self._eval) // batch_size) * batch_size, min(batch_size, len(self._eval)))
        return [b.long() for b in self._eval[:usable].split(batch_size)]


class StreamingPackedData(PackedData):
    """Train blocks pulled lazily from a hub stream, in stream order (no shuffle: hub corpora come pre-shuffled).

    Each pass over the stream is an epoch and yields the same blocks. Sequential indices are cheap; any other index
    replays the stream from its start up to that position, so a resume is exact but pays for the skipped blocks.
    num_train_blocks and train_tokens are None: a stream's length is unknown.
    """

    def __init__(self, stream: datasets.IterableDataset, tok, eval_blocks: torch.Tensor, cfg: DataConfig):
        super().__init__(None, eval_blocks, cfg.shuffle_seed, len(tok))
        self._stream, self._tok, self._cfg = stream, tok, cfg
        self._blocks_it: Iterator[list[int]] | None = None
        self._pos = 0  # blocks already served by _blocks_it
        next(self._blocks())  # fail now, not at step 1, if the stream cannot fill one block

    def _blocks(self) -> Iterator[list[int]]:
        tokenized = self._stream.map(_tokenize_fn(self._tok), batched=True, remove_columns=["text"])
        L = self.seq_len
        while True:
            buf: list[int] = []  # reset per pass, so every epoch cuts identical blocks
            served = False
            for ex in tokenized:
                buf.extend(ex["input_ids"])
                full = len(buf) // L
                for k in range(full):
                    yield buf[k * L : (k + 1) * L]
                served |= full > 0
                buf = buf[full * L :]
            if not served:
                raise _too_small(self._cfg, "train", len(buf), streaming=True)

    def train_batch(self, index: int, batch_size: int) -> torch.LongTensor:
        start = index * batch_size
        if self._blocks_it is None or start < self._pos:
            self._blocks_it, self._pos = self._blocks(), 0
        for _ in islice(self._blocks_it, start - self._pos):
            pass
        batch = torch.tensor(list(islice(self._blocks_it, batch_size)), dtype=torch.long)
        self._pos = start + batch_size
        return batch


def build_data(cfg: DataConfig, cache_dir: Path, pretrained: str = "") -> tuple[PackedData, PreTrainedTokenizerFast]:
    """Documents -> tokenizer -> packed train/eval blocks (eval blocks come from eval documents only).
    `pretrained` (model.pretrained) names the tokenizer data.tokenizer = "" stands for."""
    train_docs, eval_docs = load_documents(cfg)
    tok = load_tokenizer(cfg, cache_dir, train_docs, pretrained)
    streaming = isinstance(train_docs, datasets.IterableDataset)
    if not streaming:
        train_blocks, n_train = _pack(train_docs, tok, cfg.seq_len)
        if len(train_blocks) == 0:
            raise _too_small(cfg, "train", n_train, streaming)
    eval_blocks, n_eval = _pack(eval_docs, tok, cfg.seq_len)
    if len(eval_blocks) == 0:
        raise _too_small(cfg, "eval", n_eval, streaming)
    if streaming:
        return StreamingPackedData(train_docs, tok, eval_blocks, cfg), tok
    return PackedData(train_blocks, eval_blocks, cfg.shuffle_seed, len(tok)), tok


def build_eval_data(cfg: DataConfig, tok) -> PackedData:
    """Eval blocks only: cfg's held-out documents, packed with a trained run's tokenizer (never retrained here)."""
    _, eval_docs = load_documents(cfg)
    eval_blocks, n_eval = _pack(eval_docs, tok, cfg.seq_len)
    if len(eval_blocks) == 0:
        raise _too_small(cfg, "eval", n_eval, streaming=cfg.source.startswith("hub:"))
    return PackedData(None, eval_blocks, cfg.shuffle_seed, len(tok))
