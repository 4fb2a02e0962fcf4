"""data.prepare and data.token_files: prepared token files hold exactly the documents' tokens, train on them
equals training on the documents, a resume is a seek, an interrupted prepare is detected and redone, and a manifest
that does not match the recipe is refused with one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import expected_stream, invoke, marker_docs, texts, tiny_recipe, write_jsonl
from rich.progress import Progress

from lean_relora.data import token_files as tokens
from lean_relora.data.corpus import DataError, load_documents
from lean_relora.data.packing import build_data
from lean_relora.data.prefetch import BatchLoader
from lean_relora.data.prepare import _write_split, prepare_data
from lean_relora.data.tokenizer import _train_bpe
from lean_relora.recipe import DataConfig
from lean_relora.training import checkpoint
from lean_relora.training.loop import _resume, setup, train
from lean_relora.training.optim import set_lr
from lean_relora.training.progress import Reporter
from lean_relora.training.step import train_step


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 marker documents as jsonl, prepared once with a 512-token BPE (tests copy nothing out of it)."""
    root = tmp_path_factory.mktemp("corpus")
    cfg = DataConfig(source=str(write_jsonl(root / "docs.jsonl", marker_docs(40))), bpe_vocab_size=512, seq_len=16,
                     eval_fraction=0.2)
    prepare_data(cfg, root / "prepared")
    return cfg, root / "prepared"


def on_prepared(cfg, directory, **changes):
    return DataConfig(**{**cfg.__dict__, "source": f"prepared:{directory}", **changes})


def test_files_hold_each_splits_documents_with_offsets(corpus, tmp_path):
    cfg, directory = corpus
    prepared = tokens.open_prepared(on_prepared(cfg, directory))
    _, tok = build_data(on_prepared(cfg, directory), tmp_path)
    train_docs, eval_docs = (texts(d) for d in load_documents(cfg))
    for split, docs in ((prepared.train, train_docs), (prepared.eval, eval_docs)):
        assert split.tokens.dtype == np.uint16 and isinstance(split.tokens, np.memmap)
        assert split.tokens.tolist() == expected_stream(tok, docs)
        ends = split.offsets.tolist()
        assert ends[0] == 0 and len(ends) == len(docs) + 1
        assert [tok.decode(split.tokens[a:b - 1]) for a, b in zip(ends, ends[1:])] == docs  # EOS closes each
    manifest = prepared.manifest
    assert manifest["splits"]["train"]["documents"] == len(train_docs) and manifest["vocab_size"] == len(tok)
    assert manifest["tokenizer_sha256"] == tokens.tokenizer_hash(tok) and manifest["data"]["source"] == cfg.source
    assert tokens.token_dtype(2**16) == np.uint16 and tokens.token_dtype(2**16 + 1) == np.uint32


def test_blocks_and_order_equal_the_in_memory_path(corpus, tmp_path):
    cfg, directory = corpus
    memory, tok_a = build_data(cfg, tmp_path / "a")
    mapped, tok_b = build_data(on_prepared(cfg, directory), tmp_path / "b")
    assert tokens.tokenizer_hash(tok_a) == tokens.tokenizer_hash(tok_b)  # the BPE trains to the same tokenizer
    assert (tmp_path / "b" / "tokenizer").is_dir()  # copied into the run dir, where export and eval look
    assert mapped.num_train_blocks == memory.num_train_blocks and mapped.num_eval_blocks == memory.num_eval_blocks
    n = memory.num_train_blocks
    for index in (0, 1, n // 3, n - 1, n, 3 * n + 1):  # into later epochs and across their boundaries
        assert mapped.train_batch(index, 3).equal(memory.train_batch(index, 3))
    assert all(a.equal(b) for a, b in zip(mapped.eval_batches(2, 100), memory.eval_batches(2, 100), strict=True))


def test_a_run_on_prepared_data_equals_the_run_on_the_documents_loss_for_loss(tmp_path):
    recipe = tiny_recipe(steps=6, restart_every=3)
    recipe.data.max_documents = 30
    prepare_data(recipe.data, tmp_path / "prepared")
    direct = train(recipe, tmp_path / "direct")
    recipe.data.source = f"prepared:{tmp_path / 'prepared'}"
    mapped = train(recipe, tmp_path / "mapped")
    assert mapped.first_eval_loss == direct.first_eval_loss and mapped.last_eval_loss == direct.last_eval_loss
    assert losses(tmp_path / "mapped") == losses(tmp_path / "direct") and len(losses(tmp_path / "direct")) == 6


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


class CountingData:
    """The run's data, recording every micro-batch index read."""

    def __init__(self, data):
        self.data, self.read = data, []

    def train_batch(self, index, batch_size):
        self.read.append(index)
        return self.data.train_batch(index, batch_size)

    def __getattr__(self, name):
        return getattr(self.data, name)


def test_resume_on_prepared_data_is_a_seek(corpus, tmp_path):
    cfg, directory = corpus
    recipe = tiny_recipe(steps=8, restart_every=4, grad_accum_steps=2)
    recipe.data = on_prepared(cfg, directory)
    recipe.checkpoint.every = 5
    train(recipe, tmp_path / "whole")  # checkpoints at steps 5 and 8
    run = setup(recipe, tmp_path / "whole")
    run.data = CountingData(run.data)
    run.loader = BatchLoader(run.data, recipe.train.micro_batch_size, depth=1)
    checkpoint_dir = tmp_path / "whole" / "checkpoints" / "step-00000005"
    _resume(run, checkpoint.Checkpoint.read(checkpoint_dir), [], Reporter(tmp_path / "metrics.jsonl", 8, live=False))
    assert run.data.read == []  # nothing is replayed
    got = []
    for _ in range(3):  # the loop's step: the learning rate of the step, then the step (no restart until 8)
        set_lr(run.optimizer, recipe.optim.lr * run.schedule(run.state.step))
        got.append(train_step(run))
    run.loader.close()
    assert run.data.read[:6] == list(range(10, 16))  # the first read is the checkpoint's own position
    assert [(s, loss) for s, loss in zip(range(6, 9), got)] == losses(tmp_path / "whole")[5:]


def test_mismatched_manifest_is_refused_with_one_line(corpus, tmp_path):
    cfg, directory = corpus
    source = f"prepared:{directory}"
    cases = {
        "size": (on_prepared(cfg, directory, bpe_vocab_size=256),
                 f"data.source = '{source}': prepared with data.bpe_vocab_size = 512, the recipe says 256; set it to "
                 "match or prepare again with this recipe"),
    }
    other = tmp_path / "other_tokenizer"
    _train_bpe(["some other text to learn from"] * 3, 300).save_pretrained(other)
    cases["name"] = (on_prepared(cfg, directory, tokenizer=str(other)),
                     f"data.source = '{source}': prepared with tokenizer 'bpe', the recipe's is '{other}'; set "
                     "data.tokenizer to match or prepare again with this recipe")
    for cfg_, message in cases.values():
        with pytest.raises(DataError) as err:
            build_data(cfg_, tmp_path / "run")
        assert str(err.value) == message
    # The same name, another tokenizer: a run directory holding a different BPE is caught by its hash.
    run_dir = tmp_path / "run_with_other_bpe"
    _train_bpe(texts(load_documents(cfg)[0])[:5], 512).save_pretrained(run_dir / "tokenizer")
    with pytest.raises(DataError) as err:
        build_data(on_prepared(cfg, directory), run_dir)
    assert str(err.value).startswith(f"data.source = '{source}': the tokenizer in use (sha256 ")
    assert str(err.value).endswith("; prepare again or use that tokenizer") and "\n" not in str(err.value)


def test_cli_prepare_then_train_and_a_mismatch_exits_2(tmp_path):
    from helpers import TINY

    code, output = invoke("prepare", "--help")
    assert code == 0 and all(word in output for word in ("RECIPE", "--out", "--max-tokens", "--set"))
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "tokens"
    code, output = invoke("prepare", tmp_path / "tiny.toml", "--out", out, "--set", "data.max_documents=30")
    assert code == 0, output
    assert f"train on them with --set data.source=prepared:{out}" in " ".join(output.split())
    code, output = invoke("train", tmp_path / "tiny.toml", "--run-dir", tmp_path / "run", "--max-steps", 2,
                          "--set", f"data.source=prepared:{out}")
    assert code == 0, output
    code, output = invoke("train", tmp_path / "tiny.toml", "--run-dir", tmp_path / "bad", "--max-steps", 2,
                          "--set", f"data.source=prepared:{out}", "--set", "data.bpe_vocab_size=256")
    assert code == 2 and "Traceback" not in output
    assert output.strip().splitlines()[-1].startswith(f"error: data.source = 'prepared:{out}': prepared with "
                                                      "data.bpe_vocab_size = 512, the recipe says 256")


def test_prepare_again_is_a_no_op_and_never_overwrites_other_data(corpus, tmp_path):
    cfg, directory = corpus
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert prepare_data(cfg, directory) == tokens.read_manifest(directory, "")
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before
    with pytest.raises(DataError) as err:
        prepare_data(DataConfig(**{**cfg.__dict__, "shuffle_seed": 1}), directory)
    assert str(err.value) == (f"--out {directory}: holds data prepared with other shuffle_seed; choose another --out "
                              "or delete that directory")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tmp_path / "mine")
    assert str(err.value) == f"--out {tmp_path / 'mine'}: exists and is not a prepared data directory; choose a new one"
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]


def test_a_prepare_killed_halfway_is_detected_and_continued_to_the_same_files(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    _train_bpe(marker_docs(50), 400).save_pretrained(tokenizer_dir)
    docs = [" ".join(f"<d{i}> w{j % 13}" for j in range(60)) for i in range(4_000)]
    source = write_jsonl(tmp_path / "big.jsonl", docs)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\nsource = "{source}"\ntokenizer = "{tokenizer_dir}"\n')
    out = tmp_path / "out"
    process = subprocess.Popen([str(Path(sys.executable).parent / "lean-relora"), "prepare", str(recipe), "--out",
                                str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = tmp_path / ".out.partial" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(progress.read_text()).get("train", {}).get("documents", 0) > 0:
                os.kill(process.pid, signal.SIGKILL)  # some train documents are written, most are not
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert not out.exists()
    cfg = DataConfig(source=str(source), tokenizer=str(tokenizer_dir))
    with pytest.raises(DataError) as err:
        tokens.open_prepared(DataConfig(**{**cfg.__dict__, "source": f"prepared:{out}"}))
    assert str(err.value) == (f"data.source = 'prepared:{out}': {out} is not a prepared data directory "
                              f"(manifest.json missing) (a preparation of it was interrupted); run lean-relora prepare "
                              f"RECIPE --out {out}")
    manifest = prepare_data(cfg, out)  # continues where the killed one had got to
    assert 0 < manifest["continued_from_documents"]["train"] < manifest["splits"]["train"]["documents"]
    assert not (tmp_path / ".out.partial").exists()
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["eval"]["documents"] == len(docs)
    fresh = prepare_data(cfg, tmp_path / "fresh")
    assert fresh["continued_from_documents"] == {}
    for name in ("train.bin", "train.idx", "eval.bin", "eval.idx"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_a_stream_is_prepared_up_to_max_tokens_at_a_document_end(tmp_path, monkeypatch):
    docs = marker_docs(200)
    path = write_jsonl(tmp_path / "stream.jsonl", docs)
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: real("json", data_files=str(path), split="train", streaming=True))
    cfg = DataConfig(source="hub:someone/stub", bpe_vocab_size=300, eval_documents=10)
    manifest = prepare_data(cfg, tmp_path / "out", max_tokens=1000)
    prepared = tokens.open_prepared(on_prepared(cfg, tmp_path / "out"))
    ends = prepared.train.offsets.tolist()
    assert ends[-2] < 1000 <= ends[-1] == manifest["splits"]["train"]["tokens"]  # the document that crosses it ends
    _, tok = build_data(on_prepared(cfg, tmp_path / "out", seq_len=16), tmp_path / "run")
    assert prepared.train.tokens.tolist() == expected_stream(tok, docs[10 : 10 + len(ends) - 1])
    assert prepared.eval.tokens.tolist() == expected_stream(tok, docs[:10])


def test_a_stream_split_continues_from_its_saved_stream_position(tmp_path):
    docs = [f"<d{i}> " + "w " * (i % 7) for i in range(2_500)]  # three batches of documents
    path = write_jsonl(tmp_path / "s.jsonl", docs)
    stream = lambda: datasets.load_dataset("json", data_files=str(path), split="train",  # noqa: E731
                                           streaming=True).select_columns(["text"])
    tok = _train_bpe(docs[:50], 300)
    quiet = Progress(disable=True)
    saved = []

    def killed_after_one_batch(position):
        saved.append(position)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write_split(stream(), tok, tmp_path / "cut", np.dtype(np.uint16), 0, quiet, None, killed_after_one_batch)
    with open(tmp_path / "cut.bin", "ab") as f:
        f.write(b"\x01\x02")  # bytes written past the saved position are cut off
    position = json.loads(json.dumps(saved[0]))
    assert position["documents"] == 1000 and position["stream"] is not None
    counts = _write_split(stream(), tok, tmp_path / "cut", np.dtype(np.uint16), 0, quiet, position, lambda p: None)
    whole = _write_split(stream(), tok, tmp_path / "whole", np.dtype(np.uint16), 0, quiet, None, lambda p: None)
    assert counts["documents"] == whole["documents"] == 2_500 and counts["tokens"] == whole["tokens"]
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"cut{suffix}").read_bytes() == (tmp_path / f"whole{suffix}").read_bytes()


def test_a_truncated_or_damaged_preparation_is_refused_with_one_line(corpus, tmp_path):
    cfg, directory = corpus
    copy = Path(shutil.copytree(directory, tmp_path / "copy"))
    size = (copy / "train.bin").stat().st_size
    os.truncate(copy / "train.bin", size - 2)
    source = f"prepared:{copy}"
    with pytest.raises(DataError) as err:
        tokens.open_prepared(on_prepared(cfg, copy))
    assert str(err.value) == (f"data.source = '{source}': {copy / 'train.bin'} is {size - 2} bytes, the manifest "
                              f"says {size}; prepare it again")
    (copy / "manifest.json").write_text('{"format": 1, "spl')
    with pytest.raises(DataError) as err:
        tokens.open_prepared(on_prepared(cfg, copy))
    assert str(err.value) == (f"data.source = '{source}': {copy / 'manifest.json'} is damaged or of another format; "
                              "prepare it again")
