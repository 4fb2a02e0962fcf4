"""training.merge_log: the recorded factors of every restart sum, with the factors in training, to exactly the
update the base accumulated (its fp32 master) since the ReLoRA phase began."""

import torch

from lean_relora.model.relora import relora_layers, wrap_model
from lean_relora.recipe import LoraConfig
from lean_relora.training import merge_log as merges
from lean_relora.training.distributed import SOLO
from lean_relora.training.restart import merge_cycle


def test_recorded_merges_sum_to_the_masters_update(tiny_llama, tmp_path):
    model = tiny_llama()
    wrap_model(model, LoraConfig(rank=4, alpha=8.0, quant="nf4"), keep_master=True, dtype=torch.float32)
    start = {n: m.base.master.read().clone() for n, m in model.named_modules() if m in relora_layers(model)}
    generator = torch.Generator().manual_seed(0)
    for step in (5, 10, 15):  # three cycles trained (random B), each merged at a restart
        for layer in relora_layers(model):
            layer.lora_B.data.normal_(generator=generator)
        merges.record(model, tmp_path, step)
        merge_cycle(model, SOLO, generator)
    for layer in relora_layers(model):  # the cycle in progress, as a checkpoint at step 20 would hold it
        layer.lora_B.data.normal_(generator=generator)
    assert [p.name for p in merges.recorded(tmp_path, before=15)] == ["step-00000005.safetensors",
                                                                      "step-00000010.safetensors"]
    recorded = merges.recorded(tmp_path, before=20)
    for name, layer in ((n, m) for n, m in model.named_modules() if m in relora_layers(model)):
        update = merges.accumulated(recorded, name)
        torch.testing.assert_close(update.float(), layer.base.master.read() - start[name], rtol=1e-5, atol=1e-5)
        assert torch.linalg.matrix_rank(update).item() == 3 * 4  # three rank-4 cycles
