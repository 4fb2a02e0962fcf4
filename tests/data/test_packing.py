"""lean_relora.data.packing and lean_relora.corpus: documents, packing, batch order and the one-line errors."""

import json
import re
import time
from collections import Counter
from pydoc_data.topics import topics

import datasets
import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import expected_stream, marker_docs, texts, write_jsonl

from lean_relora.data import packing as data_module
from lean_relora.data import tokenizer
from lean_relora.data.corpus import DataError, load_documents
from lean_relora.data.packing import StreamingPackedData, build_data
from lean_relora.data.tokenizer import EOS, load_tokenizer
from lean_relora.recipe import DataConfig


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    # Keep the Arrow caches of these tests out of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory):
    cfg = DataConfig(seq_len=64)
    data, tok = build_data(cfg, tmp_path_factory.mktemp("run"))
    return cfg, data, tok










def raises(cfg, cache_dir=None) -> str:
    with pytest.raises(DataError) as err:
        build_data(cfg, cache_dir) if cache_dir else load_documents(cfg)
    message = str(err.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------- pydoc, packing


def test_pydoc_blocks_shape_dtype_and_range(pydoc):
    cfg, data, tok = pydoc
    batch = data.train_batch(0, 8)
    assert batch.shape == (8, cfg.seq_len) and batch.dtype == torch.long
    assert data.vocab_size == len(tok) == cfg.bpe_vocab_size
    evals = data.eval_batches(4, 3)
    assert len(evals) == 3 and all(b.shape == (4, cfg.seq_len) and b.dtype == torch.long for b in evals)
    for b in [batch, *evals, data.train_batch(1000, 8)]:
        assert 0 <= int(b.min()) and int(b.max()) < data.vocab_size
    assert data.train_tokens == data.num_train_blocks * cfg.seq_len > 0 and data.num_eval_blocks > 0
    assert data.eval_batches(4, 3)[2].equal(evals[2])  # eval blocks are fixed
    every = data.eval_batches(5, 10**6)  # never ragged: the tail that fills no batch is left out
    assert len(every) == data.num_eval_blocks // 5 and {b.shape[0] for b in every} == {5}
    assert data.eval_batches(10**6, 2)[0].shape[0] == data.num_eval_blocks  # too few blocks: one smaller batch


def test_pydoc_documents_are_split_disjointly_and_deterministically():
    train, test = load_documents(DataConfig())
    train_docs, test_docs = set(texts(train)), set(texts(test))
    assert not train_docs & test_docs
    assert train_docs | test_docs == {t for t in topics.values() if t.strip()}
    assert len(test) == max(1, round(79 * 0.05))
    assert set(texts(load_documents(DataConfig())[1])) == test_docs
    assert set(texts(load_documents(DataConfig(shuffle_seed=1))[1])) != test_docs
    assert len(load_documents(DataConfig(max_documents=10, eval_fraction=0.2))[0]) == 8


def test_blocks_are_each_splits_own_documents_with_eos_between(pydoc):
    cfg, data, tok = pydoc
    train, test = load_documents(cfg)
    # Eval blocks, in order, are exactly the eval documents' tokens, EOS after each, cut into seq_len blocks.
    eval_stream = torch.cat(data.eval_batches(1, 10**9)).flatten().tolist()
    assert eval_stream == expected_stream(tok, texts(test))[: len(eval_stream)]
    segments = tok.decode(eval_stream).split(EOS)
    assert len(segments) > 1 and segments[:-1] == texts(test)[: len(segments) - 1]
    # Train blocks (one epoch, as a multiset) are the train documents' stream cut the same way.
    want = expected_stream(tok, texts(train))
    n = data.num_train_blocks
    want_blocks = Counter(tuple(want[i * cfg.seq_len : (i + 1) * cfg.seq_len]) for i in range(n))
    assert Counter(tuple(data.train_batch(i, 1)[0].tolist()) for i in range(n)) == want_blocks
    assert len(want) // cfg.seq_len == n


def test_marker_documents_never_leak_between_splits(tmp_path):
    docs = marker_docs(40)
    cfg = DataConfig(source=str(write_jsonl(tmp_path / "m.jsonl", docs)), seq_len=16, eval_fraction=0.25)
    data, tok = build_data(cfg, tmp_path / "run")
    _, test = load_documents(cfg)
    eval_ids = {int(m) for doc in texts(test) for m in re.findall(r"<d(\d+)>", doc)}
    seen = lambda blocks: {int(m) for b in blocks for row in b for m in re.findall(r"<d(\d+)>", tok.decode(row))}
    train_seen = seen(data.train_batch(i, 4) for i in range(data.num_train_blocks // 4 + 1))
    eval_seen = seen(data.eval_batches(4, 10**6))
    assert eval_seen and train_seen and eval_seen <= eval_ids and not train_seen & eval_ids


# ----------------------------------------------------------------------------------------------- batch order


def test_train_batches_are_deterministic_and_cover_each_epoch(pydoc, tmp_path):
    cfg, data, _ = pydoc
    again, _ = build_data(cfg, tmp_path)
    for i in (0, 1, 7, 500):
        assert data.train_batch(i, 4).equal(again.train_batch(i, 4))
    late = data.train_batch(321, 4)
    data.train_batch(0, 4), data.train_batch(10_000, 4)
    assert data.train_batch(321, 4).equal(late)  # out-of-order access changes nothing

    n = data.num_train_blocks
    epoch0 = [tuple(data.train_batch(i, 1)[0].tolist()) for i in range(n)]
    epoch1 = [tuple(data.train_batch(n + i, 1)[0].tolist()) for i in range(n)]
    every_block = Counter(tuple(r) for r in data._train.tolist())
    assert Counter(epoch0) == Counter(epoch1) == every_block  # each block exactly once per epoch
    assert epoch0 != epoch1  # a new permutation each epoch
    # A batch is just consecutive positions of that sequence, also across the epoch boundary.
    k = n // 3
    assert data.train_batch(k, 3).tolist() == [list(r) for r in (epoch0 + epoch1)[3 * k : 3 * k + 3]]
    reseeded, _ = build_data(DataConfig(seq_len=64, shuffle_seed=5), tmp_path / "s")
    assert not data.train_batch(0, 4).equal(reseeded.train_batch(0, 4))


# ----------------------------------------------------------------------------------------------- file formats


def test_txt_files_are_one_document_each(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    files = [f"file {i}\n\nwith a blank line\n" for i in range(4)]
    for i, t in enumerate(files):
        (corpus / ("sub" if i % 2 else "") / f"f{i}.txt").write_text(t)
    (corpus / "notes.md").write_text("ignored")
    for source in (corpus, corpus / "**" / "*.txt"):
        train, test = load_documents(DataConfig(source=str(source), eval_fraction=0.25))
        assert sorted(texts(train) + texts(test)) == sorted(files) and len(test) == 1


def test_single_txt_file_is_split_at_blank_lines(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"paragraph {i} of the book." for i in range(10)))
    train, test = load_documents(DataConfig(source=str(path), eval_fraction=0.2))
    assert len(train) == 8 and len(test) == 2 and "paragraph 3 of the book." in texts(train) + texts(test)


def test_jsonl_and_parquet_respect_text_column(tmp_path):
    docs = marker_docs(10)
    write_jsonl(tmp_path / "c.jsonl", docs, column="body", lang="en")
    pq.write_table(pa.table({"content": docs, "n": list(range(10))}), tmp_path / "c.parquet")
    for source, column in (("c.jsonl", "body"), ("c.parquet", "content")):
        cfg = DataConfig(source=str(tmp_path / source), text_column=column, eval_fraction=0.3)
        train, test = load_documents(cfg)
        assert train.column_names == ["text"] and sorted(texts(train) + texts(test)) == sorted(docs)
    capped, held = load_documents(DataConfig(source=str(tmp_path / "c.jsonl"), text_column="body", max_documents=4))
    assert len(capped) + len(held) == 4


def test_changed_file_is_not_served_from_stale_cache(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", marker_docs(6))
    cfg = DataConfig(source=str(path))
    load_documents(cfg)
    time.sleep(0.02)  # let the file clock tick, as between any two real runs
    new = [f"new document {i}" for i in range(6)]
    write_jsonl(path, new)
    train, test = load_documents(cfg)
    assert sorted(texts(train) + texts(test)) == sorted(new)


def test_streaming_hub_source(tmp_path, monkeypatch):
    docs = marker_docs(30)
    path = write_jsonl(tmp_path / "stream.jsonl", docs, column="content")
    real = datasets.load_dataset
    stub = lambda *a, **k: real("json", data_files=str(path), split="train", streaming=True)  # noqa: E731
    monkeypatch.setattr(datasets, "load_dataset", stub)
    cfg = DataConfig(source="hub:someone/stub", text_column="content", eval_documents=5, seq_len=16)
    train, test = load_documents(cfg)
    assert isinstance(train, datasets.IterableDataset) and texts(test) == docs[:5]
    data, tok = build_data(cfg, tmp_path / "run")
    assert data.num_train_blocks is None and data.vocab_size == len(tok)
    want = expected_stream(tok, docs[5:])
    per_epoch = len(want) // 16
    first = [data.train_batch(i, 2) for i in range(per_epoch)]  # sequential, then into the next epoch
    flat = torch.cat(first).flatten().tolist()
    assert flat[: per_epoch * 16] == want[: per_epoch * 16]
    assert flat[per_epoch * 16 :] == want[: len(flat) - per_epoch * 16]  # the next pass repeats the stream
    assert data.train_batch(3, 2).equal(first[3])  # going back replays the stream exactly
    eval_stream = torch.cat(data.eval_batches(1, 10**6)).flatten().tolist()
    assert eval_stream == expected_stream(tok, docs[:5])[: data.num_eval_blocks * 16]


# ----------------------------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path):
    src = str(tmp_path / "nope.txt")
    assert raises(DataConfig(source=src)) == (
        f"data.source = '{src}': no such file or directory; pass an existing .txt/.jsonl/.json/.parquet file, "
        "directory or glob, 'pydoc', or 'hub:NAME'"
    )


def test_error_glob_matches_nothing(tmp_path):
    src = str(tmp_path / "*.jsonl")
    assert raises(DataConfig(source=src)) == (
        f"data.source = '{src}': the glob matches no files; fix the pattern or pass a file"
    )


def test_error_unsupported_extension(tmp_path):
    (tmp_path / "c.csv").write_text("text\nhello\n")
    src = str(tmp_path / "c.csv")
    assert raises(DataConfig(source=src)) == (
        f"data.source = '{src}': unsupported file extension .csv; use .txt, .jsonl, .json or .parquet"
    )


def test_error_missing_text_column(tmp_path):
    src = str(write_jsonl(tmp_path / "c.jsonl", ["a", "b"], column="body"))
    assert raises(DataConfig(source=src)) == (
        f"data.text_column = 'text': no such column in {src}; columns present: body, id; "
        "set data.text_column to one of them"
    )


def test_error_empty_corpus(tmp_path):
    src = str(write_jsonl(tmp_path / "c.jsonl", ["", "   \n", ""]))
    assert raises(DataConfig(source=src)) == (
        f"data.source = '{src}': no non-empty documents in column 'text'; give a corpus that contains text"
    )
    (tmp_path / "txt").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "txt" / name).write_text(" \n")
    src = str(tmp_path / "txt")
    assert raises(DataConfig(source=src)) == (
        f"data.source = '{src}': no non-empty documents; give a corpus that contains text"
    )


def test_error_single_document(tmp_path):
    src = str(write_jsonl(tmp_path / "c.jsonl", ["only one", ""]))
    assert raises(DataConfig(source=src)) == (
        f"data.source = '{src}': only 1 non-empty document; give at least 2 so one can be held out for evaluation"
    )


def _token_count(tok, docs):
    return len(expected_stream(tok, docs))


def test_error_too_few_tokens_for_one_block(tmp_path):
    src = str(write_jsonl(tmp_path / "c.jsonl", marker_docs(10)))
    cfg = DataConfig(source=src, seq_len=100_000, eval_fraction=0.1)
    train, test = load_documents(cfg)
    tok = load_tokenizer(cfg, tmp_path)
    n_train = _token_count(tok, texts(train))
    assert raises(cfg, tmp_path) == (
        f"data.seq_len = 100000: the train split has only {n_train} tokens, fewer than one block; "
        "lower data.seq_len or data.eval_fraction, or give more data"
    )
    # Enough for train blocks but not for one eval block.
    cfg = DataConfig(source=src, seq_len=n_train // 9 + 10, eval_fraction=0.1)
    n_eval = _token_count(tok, texts(test))
    assert n_eval < cfg.seq_len <= n_train
    assert raises(cfg, tmp_path) == (
        f"data.seq_len = {cfg.seq_len}: the eval split has only {n_eval} tokens, fewer than one block; "
        "lower data.seq_len, raise data.eval_fraction, or give more data"
    )


def test_error_unreachable_hub_dataset_fails_fast(monkeypatch):
    # The hub libraries read HF_HUB_OFFLINE at import time, so flip their constants as well as the variable.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    message = raises(DataConfig(source="hub:no-such-user/no-such-dataset"))
    assert time.perf_counter() - started < 5
    assert message == (
        "data.source = 'hub:no-such-user/no-such-dataset': the hub dataset 'no-such-user/no-such-dataset' could not "
        "be loaded; check the name, data.hub_config, data.split and the network, or use a local file "
        "(data.source = corpus.jsonl)"
    )


# ----------------------------------------------------------------------------------------------- stream position


def local_stream(path):
    """A local jsonl read in streaming mode: a hub dataset without the network."""
    return datasets.load_dataset("json", data_files=str(path), split="train", streaming=True).select_columns(["text"])


@pytest.mark.parametrize("stop", [40, 180])  # within the first pass, and within the second
def test_stream_resumes_from_its_saved_position_without_replay(tmp_path, stop):
    docs = [f"<d{i}> " + " ".join(f"w{(i * j) % 11}" for j in range(i % 5)) for i in range(1000)]
    path = write_jsonl(tmp_path / "s.jsonl", docs)
    cfg = DataConfig(seq_len=16)
    tok = load_tokenizer(DataConfig(source=str(path)), tmp_path)
    eval_blocks = np.zeros((1, 16), np.int64)
    whole = StreamingPackedData(local_stream(path), tok, eval_blocks, cfg)
    want = [whole.train_batch(i, 4) for i in range(250)]
    per_pass = len(expected_stream(tok, docs)) // 16
    assert torch.cat(want).flatten().tolist()[: per_pass * 16] == expected_stream(tok, docs)[: per_pass * 16]
    assert 40 * 4 < per_pass < 180 * 4 < 2 * per_pass  # the stops fall in the first and the second pass

    first = StreamingPackedData(local_stream(path), tok, eval_blocks, cfg)
    for i in range(stop):
        first.train_batch(i, 4)
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
    resumed = StreamingPackedData(local_stream(path), tok, eval_blocks, cfg)
    resumed.load_state_dict(saved)
    got = [resumed.train_batch(i, 4) for i in range(stop, 250)]
    assert all(a.equal(b) for a, b in zip(got, want[stop:], strict=True))
    # No replay: only what the remaining batches need is read, plus at most the one tokenizer batch of documents
    # the position falls in; replaying what was consumed would read far more.
    slack = data_module.STREAM_DOCUMENTS
    assert first.documents_read % 1000 > 2 * slack
    assert resumed.documents_read <= whole.documents_read - first.documents_read + slack


def test_documents_start_with_bos_where_the_tokenizer_defines_one(tmp_path):
    docs = marker_docs(12)
    with_bos = tokenizer._train_bpe(docs, 300)
    with_bos.add_special_tokens({"bos_token": "<s>"})
    with_bos.save_pretrained(tmp_path / "bos")
    cfg = DataConfig(source=str(write_jsonl(tmp_path / "m.jsonl", docs)), tokenizer=str(tmp_path / "bos"),
                     seq_len=8, eval_fraction=0.25)
    data, tok = build_data(cfg, tmp_path / "run")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert bos is not None and bos != eos
    eval_stream = torch.cat(data.eval_batches(1, 10**6)).flatten().tolist()
    _, test = load_documents(cfg)
    want = [t for doc in texts(test) for t in [bos, *tok(doc, add_special_tokens=False)["input_ids"], eos]]
    assert eval_stream == want[: len(eval_stream)] and eval_stream[0] == bos
    # Without BOS (the trained BPE), EOS alone separates documents: expected_stream has no BOS.
    plain, plain_tok = build_data(DataConfig(source=cfg.source, seq_len=8, eval_fraction=0.25), tmp_path / "plain")
    assert plain_tok.bos_token_id is None
    plain_stream = torch.cat(plain.eval_batches(1, 10**6)).flatten().tolist()
    assert plain_stream == expected_stream(plain_tok, texts(test))[: len(plain_stream)]


def test_document_mask_keeps_attention_within_each_document(tiny_llama):
    """With per-document positions a document's logits are those it gets alone; without them, earlier documents of
    the block change them (attention crosses)."""
    model = tiny_llama(vocab_size=50).eval()
    eos, first, second = 0, [5, 6, 7, 8, 9], [11, 12, 13, 14]
    block = torch.tensor([first + [eos] + second])
    positions = data_module.document_positions(block, eos)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    alone = model(input_ids=torch.tensor([second])).logits[0]
    with torch.no_grad():
        masked = model(input_ids=block, position_ids=positions).logits[0, 6:]
        crossing = model(input_ids=block).logits[0, 6:]
    torch.testing.assert_close(masked, alone.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(crossing, alone.detach(), atol=1e-3)
    two = data_module.document_positions(torch.tensor([[1, eos, eos, 2], [eos, 3, 4, eos]]), eos)
    assert two.tolist() == [[0, 1, 0, 0], [0, 0, 1, 2]]
