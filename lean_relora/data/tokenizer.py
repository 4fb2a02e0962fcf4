"""Tokenizer: a pretrained one by name (by default the pretrained model's own), or a byte-level BPE trained on the
run's train documents. Either way it is saved into the run directory and read back from there, so that a resumed
run encodes with the very same ids and a run directory needs nothing outside itself."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Iterator

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lean_relora.data.corpus import DOCUMENT_KEYS, DataError, load_documents
from lean_relora.hub import TOKENIZER, HubError, locate
from lean_relora.recipe import DataConfig

EOS = "<|endoftext|>"
BPE_STREAM_DOCS = 20_000  # a stream may be endless: the BPE learns its merges from this many leading documents
SAVED, STAMP = "tokenizer", "tokenizer_fingerprint.json"  # the run directory's copy, and what it is a copy of


def tokenizer_name(cfg: DataConfig, pretrained: str = "") -> str:
    """What data.tokenizer stands for: "" is the pretrained model's own tokenizer, or "bpe" from scratch."""
    return cfg.tokenizer or pretrained or "bpe"


def load_tokenizer(cfg: DataConfig, cache_dir: Path, documents=None, pretrained: str = ""):
    """The run's tokenizer, saved in cache_dir (the run directory) the first time and read from there after.

    `documents` (the train docs from load_documents, or any iterable of strings) saves reloading the corpus for a
    BPE; `pretrained` is model.pretrained, whose tokenizer data.tokenizer = "" means.
    """
    name = tokenizer_name(cfg, pretrained)
    target, stamp = Path(cache_dir) / SAVED, Path(cache_dir) / STAMP
    want = _bpe_fingerprint(cfg) if name == "bpe" else {"format": 1, "tokenizer": name}
    if target.is_dir() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == want:
                return AutoTokenizer.from_pretrained(target)
        except Exception:
            pass  # a damaged copy is simply made again
    if name == "bpe":
        tok = _train_bpe(load_documents(cfg)[0] if documents is None else documents, cfg.bpe_vocab_size)
    else:
        tok = _pretrained_tokenizer(name, "data.tokenizer" if cfg.tokenizer else "model.pretrained")
    stamp.unlink(missing_ok=True)  # written last: a crash mid-save must not leave a stamp vouching for it
    tok.save_pretrained(target)
    stamp.write_text(json.dumps(want, sort_keys=True))
    return AutoTokenizer.from_pretrained(target)  # same object a later reuse returns


def saved_tokenizer(run_dir: Path):
    """The tokenizer a run saved in its directory, or None for a run that has none."""
    return AutoTokenizer.from_pretrained(Path(run_dir) / SAVED) if (Path(run_dir) / SAVED).is_dir() else None


def _bpe_fingerprint(cfg: DataConfig) -> dict:
    # Everything that changes which documents the BPE is trained on, plus its size.
    return {"format": 1, **{k: getattr(cfg, k) for k in (*DOCUMENT_KEYS, "bpe_vocab_size")}}


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


def _pretrained_tokenizer(name: str, key: str):
    try:
        tok = AutoTokenizer.from_pretrained(name, **locate(name, TOKENIZER))
    except HubError as e:
        raise DataError(f"{key} = '{name}': {e}") from None
    except Exception as e:
        what = "has no tokenizer; save one there or name another in data.tokenizer" if key == "model.pretrained" \
            else "could not be loaded; pass a local tokenizer directory, a reachable hub name, or 'bpe' to train " \
                 "one on the corpus"
        raise DataError(f"{key} = '{name}': {what}") from e
    if tok.eos_token_id is None:
        fix = "name one that defines it in data.tokenizer" if key == "model.pretrained" else \
            "use a tokenizer that defines one, or 'bpe'"
        raise DataError(f"{key} = '{name}': has no eos_token to separate packed documents; {fix}")
    return tok
