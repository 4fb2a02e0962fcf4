"""Data: fixed-length token blocks of the train and held-out documents (corpus.py), encoded with the run's tokenizer
(tokenizer.py), or read from prepared token files (token_files.py, data.source = "prepared:DIR").

Tokenizing and caching are left to Hugging Face `datasets`; this module packs token streams into blocks and fixes the
order in which blocks are served. That order is a pure function of (shuffle_seed, micro-batch index), so resuming a
run on local or prepared data needs nothing but the index: a seek. A stream cannot seek; its position is its own
state (`state_dict`), which checkpoints keep.

Packed blocks join documents end to end (BOS where the tokenizer has one, EOS after each). By default attention is
causal over the whole block: a token attends to earlier documents of its block too, as in GPT-2/3, LLaMA and the
ReLoRA paper's pretraining, and EOS (and BOS) mark the boundaries the model learns to reset at. data.document_mask
keeps attention within each document instead (document_positions).
"""

from __future__ import annotations

import copy
import shutil
from itertools import chain, islice
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lean_relora.data import token_files as tokens
from lean_relora.data.corpus import DataError, load_documents
from lean_relora.data.tokenizer import SAVED, load_tokenizer, tokenizer_name
from lean_relora.recipe import DataConfig

_INT32_IDS = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})  # half int64's RAM
STREAM_DOCUMENTS = 64  # documents a stream tokenizes per call; a resume re-reads at most one such batch


def _tokenize_fn(tok):
    def tokenize(batch):
        return {"input_ids": tokens.document_ids(tok, batch["text"])}

    return tokenize


def _pack(docs: datasets.Dataset, tok, seq_len: int) -> tuple[np.ndarray, int]:
    """Blocks [n, seq_len] (int32) of the documents' concatenated tokens, and the token count before cutting."""
    tokenized = docs.map(_tokenize_fn(tok), batched=True, remove_columns=docs.column_names, features=_INT32_IDS)
    flat = pc.list_flatten(tokenized.data.column("input_ids")).to_numpy()
    n = len(flat) // seq_len  # the tail that does not fill a block is dropped
    return flat[: n * seq_len].reshape(n, seq_len), len(flat)


def _too_small(cfg: DataConfig, split: str, tokens: int, streaming: bool) -> DataError:
    knob = "data.eval_documents" if streaming else "data.eval_fraction"
    fix = f"lower data.seq_len or {knob}" if split == "train" else f"lower data.seq_len, raise {knob}"
    return DataError(
        f"data.seq_len = {cfg.seq_len}: the {split} split has only {tokens} tokens, fewer than one block; {fix}, "
        "or give more data"
    )


def document_positions(ids: torch.Tensor, eos_token_id: int) -> torch.LongTensor:
    """Position ids that restart at 0 after every EOS (and at the block start): given these and no attention mask,
    transformers' causal mask becomes block-diagonal (find_packed_sequence_indices), so no token attends to another
    document of its block (data.document_mask)."""
    index = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eos_token_id
    return index - torch.where(starts, index, 0).cummax(dim=1).values


class PackedData:
    """Token blocks of cfg.seq_len for training and evaluation: [n, seq_len] arrays in memory or memory-mapped."""

    def __init__(self, train_blocks: np.ndarray | None, eval_blocks: np.ndarray, seed: int, vocab_size: int,
                 eos_token_id: int | None = None):
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id
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
        return torch.from_numpy(self._train[rows].astype(np.int64))

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
        return [torch.from_numpy(self._eval[i : i + batch_size].astype(np.int64)) for i in range(0, usable, batch_size)]

    def state_dict(self) -> dict:
        """The position beyond the micro-batch index: none, the index is all (see StreamingPackedData)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class StreamingPackedData(PackedData):
    """Train blocks pulled lazily from a stream (hub:NAME), in stream order (no shuffle: hub corpora come
    pre-shuffled). Each pass over the stream is an epoch and yields the same blocks.

    The position after a micro-batch is `state_dict()`: the pass, the stream's own state (datasets'
    IterableDataset.state_dict) before the batch of documents being cut, the tokens carried over into that batch and
    how many of its tokens are served. `load_state_dict` continues from there, re-reading at most STREAM_DOCUMENTS
    documents. Without a state (an index out of sequence), the stream is replayed from its start to the index.
    num_train_blocks and train_tokens are None: a stream's length is unknown. `documents_read` counts the documents
    pulled from the stream.
    """

    def __init__(self, stream: datasets.IterableDataset, tok, eval_blocks: np.ndarray, cfg: DataConfig):
        super().__init__(None, eval_blocks, cfg.shuffle_seed, len(tok), tok.eos_token_id)
        self._stream, self._tok, self._cfg = stream, tok, cfg
        self._blocks_it: Iterator[tuple[np.ndarray, dict]] | None = None
        self._next = 0  # micro-batch index _blocks_it serves next
        self._state: dict = self._start(0)
        self.documents_read = 0
        next(self._blocks(self._state))  # fail now, not at step 1, if the stream cannot fill one block
        self.documents_read = 0

    @staticmethod
    def _start(index: int, epoch: int = 0) -> dict:
        return {"index": index, "pass": epoch, "stream": None, "carry": [], "consumed": 0}

    def _blocks(self, state: dict) -> Iterator[tuple[np.ndarray, dict]]:
        """(block, position after it) from `state` on, pass after pass."""
        L, epoch = self.seq_len, state["pass"]
        resume, carry, skip = state["stream"], np.asarray(state["carry"], np.int64), state["consumed"]
        while True:
            self._stream.set_epoch(epoch)
            self._stream.load_state_dict(copy.deepcopy(resume))  # None: the pass from its start
            served = resume is not None or skip > 0
            docs = iter(self._stream)
            while texts := [ex["text"] for ex in islice(docs, STREAM_DOCUMENTS)]:
                self.documents_read += len(texts)
                ids = tokens.document_ids(self._tok, texts)
                buf = np.concatenate([carry, np.fromiter(chain.from_iterable(ids), np.int64)])
                for end in range(skip + L, len(buf) + 1, L):
                    served = True
                    yield buf[end - L : end], {"pass": epoch, "stream": resume, "carry": carry.tolist(),
                                               "consumed": end}
                skip = (len(buf) - skip) // L * L + skip
                carry, skip, resume = buf[skip:], 0, self._stream.state_dict()
            if not served:
                raise _too_small(self._cfg, "train", len(carry), streaming=True)
            epoch, resume, carry, skip = epoch + 1, None, np.zeros(0, np.int64), 0  # every pass cuts the same blocks

    def train_batch(self, index: int, batch_size: int) -> torch.LongTensor:
        if self._blocks_it is None or index != self._next:
            if index == self._state["index"]:  # a loaded position, or the start
                self._blocks_it = self._blocks(self._state)
            else:  # out of sequence without a saved position: replay the stream from its start
                self._blocks_it = self._blocks(self._start(0))
                for _ in islice(self._blocks_it, index * batch_size):
                    pass
        served = list(islice(self._blocks_it, batch_size))
        self._next = index + 1
        self._state = {**served[-1][1], "index": self._next}
        return torch.from_numpy(np.stack([block for block, _ in served]))

    def state_dict(self) -> dict:
        """The position after the last micro-batch served (JSON-serializable)."""
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._state, self._blocks_it = state, None


def build_data(cfg: DataConfig, cache_dir: Path, pretrained: str = "") -> tuple[PackedData, PreTrainedTokenizerFast]:
    """Documents -> tokenizer -> packed train/eval blocks (eval blocks come from eval documents only).
    `pretrained` (model.pretrained) names the tokenizer data.tokenizer = "" stands for."""
    if tokens.is_prepared(cfg):
        return _prepared_data(cfg, cache_dir, pretrained)
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
    return PackedData(train_blocks, eval_blocks, cfg.shuffle_seed, len(tok), tok.eos_token_id), tok


def _prepared_data(cfg: DataConfig, run_dir: Path, pretrained: str) -> tuple[PackedData, PreTrainedTokenizerFast]:
    """Memory-mapped blocks of a prepared directory, with the very tokenizer that wrote them, copied into the run
    directory (where a resume, export and eval find it, as for any run)."""
    prepared = tokens.open_prepared(cfg)
    tokens.check_matches(prepared, cfg, tokenizer_name(cfg, pretrained))
    target = Path(run_dir) / SAVED
    if not target.is_dir():
        partial = Path(run_dir) / f".{SAVED}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(prepared.directory / SAVED, partial)  # a prepared directory keeps it under the same name
        partial.rename(target)
    tok = AutoTokenizer.from_pretrained(target)
    tokens.check_tokenizer(prepared, cfg, tok)
    train_blocks, eval_blocks = (getattr(prepared, s).blocks(cfg.seq_len) for s in tokens.SPLITS)
    for split, blocks in (("train", train_blocks), ("eval", eval_blocks)):
        if len(blocks) == 0:
            raise _too_small(cfg, split, prepared.manifest["splits"][split]["tokens"], streaming=False)
    return PackedData(train_blocks, eval_blocks, cfg.shuffle_seed, len(tok), tok.eos_token_id), tok


def build_eval_data(cfg: DataConfig, tok) -> PackedData:
    """Eval blocks only: cfg's held-out documents, packed with a trained run's tokenizer (never retrained here)."""
    if tokens.is_prepared(cfg):
        prepared = tokens.open_prepared(cfg)
        tokens.check_tokenizer(prepared, cfg, tok)
        eval_blocks, n_eval = prepared.eval.blocks(cfg.seq_len), prepared.manifest["splits"]["eval"]["tokens"]
    else:
        _, eval_docs = load_documents(cfg)
        eval_blocks, n_eval = _pack(eval_docs, tok, cfg.seq_len)
    if len(eval_blocks) == 0:
        raise _too_small(cfg, "eval", n_eval, streaming=cfg.source.startswith("hub:"))
    return PackedData(None, eval_blocks, cfg.shuffle_seed, len(tok), tok.eos_token_id)
