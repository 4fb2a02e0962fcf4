"""Corpus: a `DataConfig` becomes train and held-out documents, each a dataset with one "text" column.

Reading is left to Hugging Face `datasets` (text, json, parquet builders; hub streaming); this module only resolves
the source into files, keeps the text column and decides which documents are held out for evaluation.
"""

from __future__ import annotations

import codecs
import glob as globlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import datasets

from lean_relora.recipe import DataConfig

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SNIFF = 64 * 1024  # bytes of each .txt file read to tell text from binary
# The recipe fields (data.*) that choose the documents and split them into train and eval: a tokenizer trained on
# them (tokenizer.py) and prepared token files (token_files.py) record these, and are refused when they differ.
DOCUMENT_KEYS = ("source", "hub_config", "split", "text_column", "max_documents", "eval_fraction", "eval_documents",
                 "shuffle_seed")


class DataError(ValueError):
    """Bad data input; message is ONE line saying what is wrong and how to fix it."""


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
    _check_files(files, builder, cfg.source)
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as e:
        cause = e.__cause__ or e.__context__ or e  # datasets wraps the parser's error in a generic one
        why = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
        raise DataError(f"data.source = '{cfg.source}': could not be read as {builder} ({why}); fix the file") from e
    column = None if builder == "text" else cfg.text_column
    ds = _text_only(ds, column or "text", cfg)
    if cfg.max_documents:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    return _split_local(_drop_empty(ds, cfg, column), cfg)


def _check_files(files: list[str], builder: str, source: str) -> None:
    """Say plainly what datasets reports only as a generic generation error: every file empty, or a .txt file that
    is binary (a NUL byte or invalid UTF-8 in its first 64 KiB)."""
    if all(os.path.getsize(f) == 0 for f in files):
        which = files[0] if len(files) == 1 else f"all {len(files)} files"
        raise DataError(f"data.source = '{source}': {which} is empty; give a corpus that contains text")
    if builder != "text":
        return
    for f in files:
        with open(f, "rb") as handle:
            head = handle.read(SNIFF)
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
            binary = b"\0" in head
        except UnicodeDecodeError:
            binary = True
        if binary:
            raise DataError(f"data.source = '{source}': {f} is binary, not UTF-8 text; give text files (.txt) or "
                            "convert it to UTF-8")


@contextmanager
def _quiet_datasets():
    """datasets logs a parse error at ERROR level before raising it; the DataError we raise says the same in one
    line, so its log is held back while it reads."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


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
