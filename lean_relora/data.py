"""Data: a `DataConfig` becomes documents, a tokenizer and fixed-length token blocks.

Loading, tokenizing and caching are left to Hugging Face `datasets`/`tokenizers`; this module only decides which
documents are held out, packs token streams into blocks and fixes the order in which blocks are served. That order is
a pure function of (shuffle_seed, micro-batch index), so resuming a run needs nothing but the index.
"""

from __future__ import annotations

import glob as globlib
import json
from itertools import islice
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .recipe import DataConfig

EOS = "<|endoftext|>"
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BPE_STREAM_DOCS = 20_000  # a stream may be endless: the BPE learns its merges from this many leading documents
_INT32_IDS = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})  # half int64's RAM


class DataError(ValueError):
    """Bad data input; message is ONE line saying what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------- documents


def load_documents(cfg: DataConfig):
    """(train_docs, eval_docs), each with a single "text" column.

    Local data gives two `datasets.Dataset`s split by a seeded shuffle of documents; "hub:NAME" gives an in-memory
    eval Dataset (the first cfg.eval_documents documents) and a streaming `IterableDataset` of the rest.
    """
    if cfg.source == "pydoc":
        from pydoc_data.topics import topics  # CPython's bundled docs: a corpus that needs no download

        keys = sorted(topics)[: cfg.max_documents or None]
        return _split_local(_drop_empty(datasets.Dataset.from_dict({"text": [topics[k] for k in keys]}), cfg), cfg)
    if cfg.source.startswith("hub:"):
        return _load_hub(cfg, cfg.source[len("hub:") :])

    files, builder = _resolve_files(cfg.source)
    # One .txt file would be one document and could not be split for evaluation, so it is cut at blank lines.
    kwargs = {"sample_by": "paragraph" if len(files) == 1 else "document"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise DataError(f"data.source = '{cfg.source}': could not be read as {builder} ({why}); fix the file") from e
    column = None if builder == "text" else cfg.text_column
    ds = _text_only(ds, column or "text", cfg)
    if cfg.max_documents:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    return _split_local(_drop_empty(ds, cfg, column), cfg)


def _resolve_files(source: str) -> tuple[list[str], str]:
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = sorted(str(Path(p).resolve()) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.source = '{source}': the glob matches no files; fix the pattern or pass a file")
    elif path.is_dir():
        visible = (p for p in path.rglob("*") if not any(s.startswith(".") for s in p.relative_to(path).parts))
        files = sorted(str(p.resolve()) for p in visible if p.is_file() and p.suffix.lower() in BUILDERS)
        if not files:
            raise DataError(
                f"data.source = '{source}': the directory holds no .txt, .jsonl, .json or .parquet files; "
                "add some or point data.source at a file"
            )
    elif path.is_file():
        files = [str(path.resolve())]
    else:
        raise DataError(
            f"data.source = '{source}': no such file or directory; pass an existing .txt/.jsonl/.json/.parquet "
            "file, directory or glob, 'pydoc', or 'hub:NAME'"
        )
    bad = sorted({Path(f).suffix or "(none)" for f in files if Path(f).suffix.lower() not in BUILDERS})
    if bad:
        raise DataError(
            f"data.source = '{source}': unsupported file extension {bad[0]}; use .txt, .jsonl, .json or .parquet"
        )
    kinds = sorted({BUILDERS[Path(f).suffix.lower()] for f in files})
    if len(kinds) > 1:
        raise DataError(f"data.source = '{source}': mixes {' and '.join(kinds)} files; use files of one format")
    return files, kinds[0]


def _text_only(ds, column: str, cfg: DataConfig):
    """Keep only the text column, renamed to "text", so everything downstream is format-agnostic."""
    names = ds.column_names
    if names is None:  # a stream that declares no features: its first record tells
        first = next(iter(ds), None)
        if first is None:
            raise _empty(cfg, column)
        names = list(first)
    if column not in names:
        raise DataError(
            f"data.text_column = '{column}': no such column in {cfg.source}; columns present: {', '.join(names)}; "
            "set data.text_column to one of them"
        )
    feature = (ds.features or {}).get(column)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"data.text_column = '{column}': holds {feature}, not text; name a column of strings")
    ds = ds.select_columns([column])
    return ds if column == "text" else ds.rename_column(column, "text")


def _drop_empty(ds, cfg: DataConfig, column: str | None = None):
    ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
    if isinstance(ds, datasets.Dataset) and len(ds) == 0:
        raise _empty(cfg, column)
    return ds


def _split_local(ds: datasets.Dataset, cfg: DataConfig):
    n = len(ds)
    if n < 2:
        raise DataError(
            f"data.source = '{cfg.source}': only 1 non-empty document; give at least 2 so one can be held out for "
            "evaluation"
        )
    n_eval = min(n - 1, max(1, round(n * cfg.eval_fraction)))
    split = ds.train_test_split(test_size=n_eval, seed=cfg.shuffle_seed)
    return split["train"], split["test"]


def _load_hub(cfg: DataConfig, name: str):
    try:
        ds = datasets.load_dataset(name, cfg.hub_config or None, split=cfg.split, streaming=True)
        if cfg.max_documents:
            ds = ds.take(cfg.max_documents)
        ds = _drop_empty(_text_only(ds, cfg.text_column, cfg), cfg, cfg.text_column)
        eval_texts = [ex["text"] for ex in ds.take(cfg.eval_documents)]
    except DataError:
        raise
    except Exception as e:  # unknown name, offline, gated, bad config/split: the cause stays chained
        raise DataError(
            f"data.source = '{cfg.source}': the hub dataset '{name}' could not be loaded; check the name, "
            "data.hub_config, data.split and the network, or use a local file (data.source = corpus.jsonl)"
        ) from e
    if not eval_texts:
        raise _empty(cfg, cfg.text_column)
    return ds.skip(cfg.eval_documents), datasets.Dataset.from_dict({"text": eval_texts})


def _empty(cfg: DataConfig, column: str | None = None) -> DataError:
    where = f" in column '{column}'" if column else ""
    return DataError(f"data.source = '{cfg.source}': no non-empty documents{where}; give a corpus that contains text")


# ----------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(cfg: DataConfig, cache_dir: Path, documents=None) -> PreTrainedTokenizerFast:
    """The run's tokenizer; a trained BPE is cached in cache_dir so a resumed run gets the very same ids.

    `documents` (the train docs from load_documents, or any iterable of strings) saves reloading the corpus.
    """
    if cfg.tokenizer != "bpe":
        return _pretrained_tokenizer(cfg.tokenizer)
    target, stamp = Path(cache_dir) / "tokenizer", Path(cache_dir) / "tokenizer_fingerprint.json"
    want = _bpe_fingerprint(cfg)
    if target.is_dir() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == want:
                return PreTrainedTokenizerFast.from_pretrained(target)
        except Exception:
            pass  # a damaged cache is simply retrained
    if documents is None:
        documents = load_documents(cfg)[0]
    tok = _train_bpe(documents, cfg.bpe_vocab_size)
    stamp.unlink(missing_ok=True)  # written last: a crash mid-save must not leave a stamp vouching for it
    tok.save_pretrained(target)
    stamp.write_text(json.dumps(want, sort_keys=True))
    return PreTrainedTokenizerFast.from_pretrained(target)  # same object a later reuse returns


def _bpe_fingerprint(cfg: DataConfig) -> dict:
    # Everything that changes which documents the BPE is trained on, plus its size.
    keys = ("source", "hub_config", "split", "text_column", "max_documents", "eval_fraction", "eval_documents",
            "shuffle_seed", "bpe_vocab_size")
    return {"format": 1, **{k: getattr(cfg, k) for k in keys}}


def _train_bpe(documents, vocab_size: int) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # bytes: any text encodes, nothing is <unk>
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_texts(documents), trainer=trainer)
    # No clean-up of spaces on decode, so decode(encode(s)) == s.
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, clean_up_tokenization_spaces=False)


def _texts(documents) -> Iterator[str]:
    if isinstance(documents, datasets.Dataset):
        for i in range(0, len(documents), 1000):
            yield from documents[i : i + 1000]["text"]
    elif isinstance(documents, datasets.IterableDataset):
        yield from (ex["text"] for ex in islice(documents, BPE_STREAM_DOCS))
    else:
        yield from documents


def _pretrained_tokenizer(name: str):
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise DataError(
            f"data.tokenizer = '{name}': could not be loaded; pass a local tokenizer directory, a reachable hub name, "
            "or 'bpe' to train one on the corpus"
        ) from e
    if tok.eos_token_id is None:
        raise DataError(
            f"data.tokenizer = '{name}': has no eos_token to separate packed documents; use a tokenizer that "
            "defines one, or 'bpe'"
        )
    return tok


# ----------------------------------------------------------------------------------------------- packing


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


def build_data(cfg: DataConfig, cache_dir: Path) -> tuple[PackedData, PreTrainedTokenizerFast]:
    """Documents -> tokenizer -> packed train/eval blocks (eval blocks come from eval documents only)."""
    train_docs, eval_docs = load_documents(cfg)
    tok = load_tokenizer(cfg, cache_dir, train_docs)
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
