"""The Hugging Face causal LM that ReLoRA trains: a LLaMA built from the recipe's sizes, or a pretrained one."""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

from lean_relora.hub import HubError, locate
from lean_relora.recipe import ModelConfig, RecipeError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def llama_config(cfg: ModelConfig, vocab_size: int, eos_token_id: int | None = None) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )


def pretrained_config(name: str) -> PretrainedConfig:
    """The config of model.pretrained `name` (local directory or hub name) alone: no weight is read."""
    return copy.deepcopy(_read_config(name))  # a copy: building a model sets attributes on its config


@lru_cache(maxsize=None)  # read once per process: the estimate builds the model several times (a hub round trip each)
def _read_config(name: str) -> PretrainedConfig:
    located = _located(name)
    try:
        return AutoConfig.from_pretrained(name, **located)
    except (OSError, ValueError) as e:
        raise RecipeError(f"model.pretrained = {name!r}: its config cannot be read ({_first_line(e)}); "
                          "give a transformers model directory or hub name") from None


def architecture(cfg: ModelConfig, vocab_size: int, eos_token_id: int | None = None) -> PretrainedConfig:
    """The config the model is built from: the pretrained model's, or a LLaMA of the recipe's sizes."""
    return pretrained_config(cfg.pretrained) if cfg.pretrained else llama_config(cfg, vocab_size, eos_token_id)


def sizes(config: PretrainedConfig) -> dict:
    """ModelConfig's size fields read from a transformers config (the memory model's inputs; transformers maps
    GPT-2's n_embd, n_layer, n_head to these names)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    return {"hidden_size": hidden, "num_layers": config.num_hidden_layers, "num_heads": heads,
            "intermediate_size": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
            or 4 * hidden, "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "tie_embeddings": bool(getattr(config, "tie_word_embeddings", False)), "vocab_size": config.vocab_size}


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_token_id: int | None = None,
                config: PretrainedConfig | None = None) -> PreTrainedModel:
    """A model in `cfg.dtype` in host memory: pretrained weights if `cfg.pretrained` names them, else a random LLaMA.
    With `config` (a checkpoint's, or a pretrained model's for the memory estimate) that architecture is built with
    random weights instead, and nothing is read from model.pretrained.
    The caller seeds torch beforehand (the random init is then reproducible) and moves the model to its device,
    after quantizing the base so that the dense model never has to fit on the accelerator."""
    dtype = DTYPES[cfg.dtype]
    if cfg.pretrained and config is None:
        located = _located(cfg.pretrained)
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, dtype=dtype, **located)
        except (OSError, ValueError) as e:
            raise RecipeError(f"model.pretrained = {cfg.pretrained!r}: cannot be loaded ({_first_line(e)}); "
                              "give a transformers model directory or hub name") from None
    else:
        # Built in its dtype (not built in fp32 and cast): half the host memory, and it also works under FakeTensorMode.
        model = AutoModelForCausalLM.from_config(config or llama_config(cfg, vocab_size, eos_token_id), dtype=dtype)
    return prepare_model(model, cfg, vocab_size, seq_len)


def prepare_model(model: PreTrainedModel, cfg: ModelConfig, vocab_size: int, seq_len: int) -> PreTrainedModel:
    """Check a pretrained model against the data, and set it up for training (no KV cache, checkpointing)."""
    if cfg.pretrained:
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and seq_len > positions:
            raise RecipeError(f"data.seq_len = {seq_len}: must be <= the model's max_position_embeddings ({positions})")
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise RecipeError(f"data.tokenizer: vocabulary of {vocab_size} tokens exceeds the model's embedding "
                              f"({model.get_input_embeddings().num_embeddings}); use the model's own tokenizer")
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant gradient checkpointing of every block, by whichever name this transformers has: newer releases
    call it `activation_checkpointing_enable` (the old name warns there); 5.17 and older have only the old one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _located(name: str) -> dict:
    try:
        return locate(name)
    except HubError as e:
        raise RecipeError(f"model.pretrained = {name!r}: {e}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
