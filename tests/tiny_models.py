"""Tiny pretrained models of the architectures users bring, built from their transformers configs and saved with
save_pretrained beside a tiny BPE tokenizer trained here: what `model.pretrained = DIR` finds on a user's disk."""

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

from lean_relora.data.tokenizer import _train_bpe

TEXT = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
        "Language models predict the next token of a text.", "0123456789 + - * / = ( ) [ ] { }"]
VOCAB = 300  # byte alphabet, the EOS token and a few merges
POSITIONS = 2048  # the 7b recipe's seq_len, which memory-estimate checks against the model's own limit


def _llama_like(cls, vocab: int, eos: int, **extra):
    return cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=POSITIONS, eos_token_id=eos, bos_token_id=eos,
               pad_token_id=eos, **extra)


CONFIGS = {
    "llama": lambda vocab, eos: _llama_like(LlamaConfig, vocab, eos),
    "qwen2": lambda vocab, eos: _llama_like(Qwen2Config, vocab, eos),  # q, k, v with bias
    "mistral": lambda vocab, eos: _llama_like(MistralConfig, vocab, eos, sliding_window=None),
    "gemma": lambda vocab, eos: _llama_like(GemmaConfig, vocab, eos, head_dim=8),  # tied embeddings
    "phi3": lambda vocab, eos: _llama_like(Phi3Config, vocab, eos),  # fused qkv_proj and gate_up_proj
    "gpt2": lambda vocab, eos: GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS,
                                          eos_token_id=eos, bos_token_id=eos),  # Conv1D projections, LayerNorm
}


def save_tiny_model(arch: str, directory: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny `arch` model and its tokenizer in `directory`; returns it."""
    tok = _train_bpe(TEXT * 4, VOCAB)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](len(tok), tok.eos_token_id))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return Path(directory)
