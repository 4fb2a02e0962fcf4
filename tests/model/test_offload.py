"""train.offload_activations: the activations gradient checkpointing keeps wait in host RAM; gradients do not change,
the blocks' own tensors and the parameters stay, and the traced GPU peak falls by the block inputs."""


import pytest
import torch
from helpers import BATCH, HIDDEN, LAYERS, SEQ, checkpointed_llama, gradients

from lean_relora.memory.analytic import analytic, recipe_vocab_size
from lean_relora.memory.host_ram import offloaded_bytes
from lean_relora.memory.trace import trace
from lean_relora.model.offload import OffloadSaved
from lean_relora.recipe import RecipeError, load_recipe

RECIPE = "recipes/1b3_12gb.toml"  # the suite runs from the repository root, as test_memory's do






def test_offloaded_activations_leave_every_gradient_bit_for_bit_unchanged_and_move_only_the_block_inputs():
    model = checkpointed_llama()
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    plain = gradients(model, ids)
    block_input = BATCH * SEQ * HIDDEN * 4  # fp32 model
    # A copy to another CPU tensor stands in for the GPU -> host copy; the threshold keeps small tensors in place.
    hooks = OffloadSaved(torch.device("cpu"), min_bytes=block_input)
    offloaded = gradients(model, ids, hooks)
    for a, b in zip(plain, offloaded):
        assert torch.equal(a, b)
    # Each block's input, the three tensors the final norm saves and the loss's hidden states (the same size each):
    # none of the blocks' own saved tensors (the checkpoint's hooks keep those) and no parameter (the head's weight
    # is saved by the loss and is as large).
    assert hooks.offloaded == (LAYERS + 4) * block_input


def test_parameters_are_never_offloaded():
    moved = []
    hooks = OffloadSaved(torch.device("cpu"), min_bytes=0)
    hooks_pack = hooks.pack_hook

    def spy(tensor):
        packed = hooks_pack(tensor)
        if not isinstance(packed, torch.Tensor):
            moved.append(tensor)
        return packed
    hooks.pack_hook = spy
    model = checkpointed_llama()
    gradients(model, torch.randint(0, 128, (BATCH, SEQ)), hooks)
    assert moved and not any(isinstance(t, torch.nn.Parameter) for t in moved)


def test_the_1b3_recipe_peak_falls_by_the_block_inputs_and_the_host_holds_them():
    recipe = load_recipe(RECIPE, ["train.offload_activations=false"])
    offloaded = load_recipe(RECIPE, ["train.offload_activations=true"])
    vocab = recipe_vocab_size(recipe)
    kept, moved = trace(recipe, vocab).peak, trace(offloaded, vocab).peak
    m = recipe.model
    block_input = recipe.train.micro_batch_size * recipe.data.seq_len * m.hidden_size * 2
    # All but the block being recomputed wait in host RAM (the peak is during the last blocks' recomputation).
    assert kept - moved >= (m.num_layers - 2) * block_input
    assert analytic(recipe, vocab)["activations"] - analytic(offloaded, vocab)["activations"] == \
        (m.num_layers - 1) * block_input
    assert offloaded_bytes(offloaded) >= m.num_layers * block_input


def test_offloading_needs_checkpointing_and_does_nothing_on_a_cpu():
    with pytest.raises(RecipeError, match="model.gradient_checkpointing = true"):
        load_recipe(RECIPE, ["train.offload_activations=true", "model.gradient_checkpointing=false"])
    on_cpu = load_recipe(RECIPE, ["train.offload_activations=true", "train.device='cpu'"])
    assert not on_cpu.train.offloads  # the activations are in host RAM already
    on_gpu = load_recipe(RECIPE, ["train.offload_activations=true"])
    vocab = recipe_vocab_size(on_gpu)
    assert analytic(on_cpu, vocab)["activations"] > analytic(on_gpu, vocab)["activations"]
