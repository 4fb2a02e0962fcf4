"""training.restart: the one restart routine equals each layer's own merge-and-reinit, for one process."""

import copy

import torch

from lean_relora.model.relora import relora_layers, wrap_model
from lean_relora.recipe import LoraConfig
from lean_relora.training.distributed import SOLO
from lean_relora.training.restart import merge_cycle


def test_the_restart_routine_equals_every_layer_merged_and_redrawn_in_turn(tiny_llama):
    model = tiny_llama()
    wrap_model(model, LoraConfig(rank=4, quant="nf4"), keep_master=True, dtype=torch.float32,
               generator=torch.Generator().manual_seed(0))
    for layer in relora_layers(model):  # a cycle's worth of training: B no longer zero
        torch.nn.init.normal_(layer.lora_B, std=0.02, generator=torch.Generator().manual_seed(1))
    twin = copy.deepcopy(model)
    merge_cycle(model, SOLO, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    for layer in relora_layers(twin):
        layer.merge_and_reinit(generator)  # W <- W + s B A, then A re-drawn and B = 0
    for ours, theirs in zip(relora_layers(model), relora_layers(twin)):
        assert all(torch.equal(a, b) for a, b in zip(ours.base.stored_tensors(), theirs.base.stored_tensors()))
        assert torch.equal(ours.base.master.read(), theirs.base.master.read())
        assert torch.equal(ours.lora_A, theirs.lora_A) and not ours.lora_B.any()
