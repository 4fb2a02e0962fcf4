"""lean-relora: memory-lean ReLoRA pretraining on a 4-bit/8-bit frozen base.

The packages are the architecture; imports flow one way (tests/test_layers.py enforces it):

    cli/       the command line: commands, exit codes and one-line errors, run directories, the torchrun launcher
    tools/     what runs on a finished or running run: export, rebuild from a checkpoint, HF shards, report, spectrum
    memory/    memory before and while training: the GPU estimate (traced and analytic), host RAM, measurement
    training/  the loop and its events: step, restart, optimizer, schedule, checkpoints, ranks, metrics
    model/     the network: build, streamed load, ReLoRA layers on a frozen quantized base, masters, loss, offload
    data/      documents to token blocks: corpus, tokenizer, prepared token files, packing, prefetch
    recipe, hub, durable, sysmem   the typed recipe; where a model lives; atomic writes; the C library's memory

Arrows: cli -> tools, memory -> training -> model, data -> recipe, hub, durable, sysmem.
"""
