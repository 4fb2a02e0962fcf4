"""Training: the order of events (warm start, cycles, restarts, evaluation, checkpoints, signals) and each event's work.

    loop          train(): setup, the warm start, the ReLoRA cycles, resume, stop on a signal
    run           Run and TrainState: what the loop, the step and a checkpoint share
    step          one optimizer step over its micro-batches, and one evaluation
    restart       one restart: merge, re-init, optimizer reset, retention, for one process or several ranks
    optim         bitsandbytes 8-bit AdamW and the partial reset of its state
    schedule      the jagged cosine learning rate
    distributed   ranks: process group, DDP, which rank keeps which master, broadcasts
    checkpoint    atomic, verified checkpoints of the whole state, and finding the one to resume
    merge_log     the factors every restart merged (read by report --spectrum)
    peak          every run's measured peak memory beside the estimate, in metrics.jsonl and the summary
    progress      the status line and metrics.jsonl
    sinks         copies of the metrics to TensorBoard and W&B
"""
