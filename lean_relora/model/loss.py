"""The causal LM loss without the full logits: linear + cross-entropy over chunks of tokens.

Hugging Face's loss materializes the logits of every token (tokens x vocab, in bf16 under autocast, again in fp32,
plus their log-probabilities and gradients): 1.7 GiB for 8 x 512 tokens of a 32k vocabulary, more than a 1.3B
ReLoRA cycle's weights, gradients and optimizer state together. `ChunkedLinearCrossEntropy` computes the same loss
chunk by chunk: forward keeps two fp32 scalars per token (the log-sum-exp and the target's logit), backward recomputes
each chunk's logits and turns them into the gradients of the hidden states, the output weight and its bias. Only the
last chunk's logits are kept from forward (backward starts with them), so a micro-batch that fits one chunk is never
recomputed.

Numerics follow HF's: the chunk's logits come out of the matmul in the autocast dtype (as `lm_head` under autocast
gives them) and everything after is fp32. The output weight's gradient is accumulated over the chunks in the
weight's dtype, as autograd accumulates it over micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lean_relora.model.frozen_base import matmul_dtype
from lean_relora.recipe import RecipeError

IGNORE_INDEX = -100  # a label that is not predicted (HF's and torch's convention)


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to the logits between its output layer and the softmax (HF config attributes)."""

    scale: float = 1.0  # logits * scale: Cohere's `logit_scale`, 1 / Granite's `logits_scaling`
    softcap: float | None = None  # cap * tanh(logits / cap): Gemma 2/3's `final_logit_softcapping`

    @classmethod
    def of(cls, config) -> LogitTransform:
        scale = getattr(config, "logit_scale", None) or 1.0
        if getattr(config, "logits_scaling", None):
            scale /= config.logits_scaling
        return cls(float(scale), getattr(config, "final_logit_softcapping", None) or None)

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def backward_(self, grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """dL/dz from dL/dy, where y = apply_(z)."""
        if self.softcap:
            grad.mul_(1 - (y / self.softcap).square_())
        if self.scale != 1.0:
            grad.mul_(self.scale)
        return grad


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
            transform: LogitTransform) -> torch.Tensor:
    """fp32 logits of one chunk, through a matmul in `dtype`."""
    z = F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).float()
    return transform.apply_(z)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens t with targets[t] != IGNORE_INDEX of -log softmax(T(hidden[t] @ weight.T + bias))[targets[t]],
    for hidden (N, h), weight (V, h), bias (V,) or None, targets (N,); T is the model's LogitTransform. The matmuls run
    in `dtype`, at most `chunk` tokens' logits are held at once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype, transform: LogitTransform):
        with torch.autocast(hidden.device.type, enabled=False):
            valid = targets != IGNORE_INDEX
            safe = targets.clamp(min=0)
            lse = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
            picked = torch.empty_like(lse)
            for start in range(0, len(targets), chunk):
                end = min(start + chunk, len(targets))
                y = _logits(hidden[start:end], weight, bias, dtype, transform)
                picked[start:end] = y.gather(1, safe[start:end, None]).squeeze(1)
                lse[start:end] = y.logsumexp(1)
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
            ctx.last = y if any(ctx.needs_input_grad[:3]) else None  # freed with ctx under no_grad
            ctx.chunk, ctx.dtype, ctx.transform = chunk, dtype, transform
            return ((lse - picked) * valid).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, dtype, transform = ctx.chunk, ctx.dtype, ctx.transform
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        w = weight.to(dtype)
        starts = list(range(0, len(targets), chunk))
        with torch.autocast(hidden.device.type, enabled=False):
            for start in reversed(starts):  # the last chunk first: its logits are still there from forward
                end = min(start + chunk, len(targets))
                x, t = hidden[start:end], targets[start:end]
                y = ctx.last if start == starts[-1] and ctx.last is not None else _logits(x, weight, bias, dtype,
                                                                                          transform)
                ctx.last = None
                # d loss / d y = softmax(y) - onehot(target), scaled by the incoming gradient; 0 on ignored tokens
                grad = torch.exp(y - lse[start:end, None]) if transform.softcap else y.sub_(lse[start:end, None]).exp_()
                valid = t != IGNORE_INDEX
                grad.scatter_add_(1, t.clamp(min=0)[:, None], -valid[:, None].float())
                grad.mul_((grad_loss * valid)[:, None])
                grad = transform.backward_(grad, y)
                del y
                if need_bias:
                    grad_bias += grad.sum(0)
                grad = grad.to(dtype)
                if need_hidden:
                    grad_hidden[start:end] = grad @ w
                if need_weight:
                    if grad_weight.dtype == dtype:
                        grad_weight.addmm_(grad.t(), x.to(dtype))
                    else:  # fp32 weight under autocast: the bf16 product is added in fp32
                        grad_weight += grad.t() @ x.to(dtype)
        return (grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk_tokens: int,
                         transform: LogitTransform = LogitTransform()) -> torch.Tensor:
    """HF's causal LM loss from the final hidden states (batch, seq, h): position t predicts labels[:, t + 1],
    IGNORE_INDEX labels are left out, the mean is over the predicted tokens."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    total = ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets,
                                            chunk_tokens, matmul_dtype(head.weight), transform)
    return total / (targets != IGNORE_INDEX).sum()


def output_head(model: nn.Module) -> nn.Linear:
    """The model's output layer, which the chunked loss computes through; RecipeError (one line) if it is not a
    plain Linear."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise RecipeError(f"train.loss_chunk_tokens: the model's output layer is a {type(head).__name__}, not a plain "
                          "Linear; set train.loss_chunk_tokens = 0 for Hugging Face's own loss")
    return head


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, chunk_tokens: int,
                   labels: torch.Tensor | None = None, **inputs) -> torch.Tensor:
    """The mean next-token loss of a Hugging Face causal LM, as `model(input_ids, labels=labels, **inputs).loss`
    (labels default to input_ids; `inputs` such as position_ids go to the model); chunk_tokens > 0 never holds more
    than that many tokens' logits, 0 is HF's own loss."""
    labels = input_ids if labels is None else labels
    if not chunk_tokens:
        return model(input_ids=input_ids, labels=labels, **inputs).loss
    hidden = model.base_model(input_ids=input_ids, use_cache=False, **inputs)[0]
    return linear_cross_entropy(hidden, output_head(model), labels, chunk_tokens, LogitTransform.of(model.config))
