"""The network ReLoRA trains: a Hugging Face causal LM whose block projections become ReLoRA layers.

    build         the model: a LLaMA from the recipe's sizes or a pretrained one, set up for training
    streamed      a pretrained safetensors model read one tensor at a time into a model on meta
    relora        ReLoRALinear (frozen base + s B A) and the choice of which layers get one
    frozen_base   the frozen weight stored through bitsandbytes (nf4, fp4, int8) and what a merge kept
    master        the fp32 copy a merge adds into (RAM or memory-mapped files on disk)
    loss          the causal-LM loss computed in chunks of tokens, never the full logits at once
    offload       checkpointed activations parked in pinned host RAM between forward and backward
    gradinit      factors initialised from the gradient's top singular subspace (relora.init = "gradient")
"""

from lean_relora.model.build import build_model
from lean_relora.model.relora import ReLoRALinear, relora_layers, wrap_model

__all__ = ["ReLoRALinear", "build_model", "relora_layers", "wrap_model"]
