"""Tokenizer: a pretrained one by name, or a byte-level BPE trained on the run's train documents and cached in the
run directory, so that a resumed run encodes with the very same ids."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Iterator

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lean_relora.corpus import DataError, load_documents
from lean_relora.recipe import DataConfig

EOS = "<|endoftext|>"
BPE_STREAM_DOCS = 20_000  # a stream may be endless: the BPE learns its merges from this many leading documents


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
