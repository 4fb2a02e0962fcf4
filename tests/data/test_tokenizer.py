"""lean_relora.data.tokenizer: the cached BPE and the one-line errors of a pretrained tokenizer."""

import json
import time

import datasets
import pytest

from lean_relora.data import tokenizer
from lean_relora.data.corpus import DataError
from lean_relora.data.tokenizer import EOS, load_tokenizer
from lean_relora.recipe import DataConfig


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    # Keep the Arrow caches of these tests out of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def test_bpe_tokenizer_is_cached_and_round_trips(tmp_path, monkeypatch):
    cfg = DataConfig()
    started = time.perf_counter()
    tok = load_tokenizer(cfg, tmp_path)
    assert time.perf_counter() - started < 10
    saved = tmp_path / "tokenizer" / "tokenizer.json"
    mtime = saved.stat().st_mtime_ns
    assert tok.eos_token == EOS and len(tok) == cfg.bpe_vocab_size
    for s in ["def f(x):\n    return x  + 1\n", "  spaces ,  and . punctuation ", "unicode: é 中文 🙂\t"]:
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s

    monkeypatch.setattr(tokenizer, "_train_bpe", lambda *a: pytest.fail("retrained although cached"))
    cached = load_tokenizer(DataConfig(seq_len=32), tmp_path)  # seq_len does not affect the tokenizer
    assert saved.stat().st_mtime_ns == mtime and cached.get_vocab() == tok.get_vocab()

    monkeypatch.undo()
    smaller = load_tokenizer(DataConfig(bpe_vocab_size=1000), tmp_path)  # another size: retrained
    assert len(smaller) == 1000
    assert json.loads((tmp_path / "tokenizer_fingerprint.json").read_text())["bpe_vocab_size"] == 1000


def test_pretrained_tokenizer_errors(tmp_path):
    missing = tmp_path / "no_tokenizer"
    with pytest.raises(DataError) as err:
        load_tokenizer(DataConfig(tokenizer=str(missing)), tmp_path)
    assert str(err.value) == (
        f"data.tokenizer = '{missing}': no such local directory; give an existing directory or a hub name such as "
        "Qwen/Qwen2.5-0.5B"
    )
    no_eos = tokenizer._train_bpe(["some text to learn from"] * 3, 300)
    no_eos.eos_token = None
    no_eos.save_pretrained(tmp_path / "no_eos")
    with pytest.raises(DataError) as err:
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "no_eos")), tmp_path)
    assert str(err.value) == (
        f"data.tokenizer = '{tmp_path / 'no_eos'}': has no eos_token to separate packed documents; "
        "use a tokenizer that defines one, or 'bpe'"
    )


def test_the_pretrained_models_own_tokenizer_is_the_default_and_the_run_keeps_a_copy(tmp_path):
    model_dir = tmp_path / "model"
    own = tokenizer._train_bpe(["some text to learn from"] * 3, 300)
    own.save_pretrained(model_dir)
    tok = load_tokenizer(DataConfig(), tmp_path / "run", pretrained=str(model_dir))
    assert tok.get_vocab() == own.get_vocab() and (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    (model_dir / "tokenizer.json").unlink()  # the model directory changes or goes away: the run has its own copy
    assert load_tokenizer(DataConfig(), tmp_path / "run", pretrained=str(model_dir)).get_vocab() == tok.get_vocab()
    with pytest.raises(DataError) as err:
        load_tokenizer(DataConfig(), tmp_path / "other_run", pretrained=str(model_dir))
    assert str(err.value) == (f"model.pretrained = '{model_dir}': has no tokenizer; save one there or name another "
                              "in data.tokenizer")
