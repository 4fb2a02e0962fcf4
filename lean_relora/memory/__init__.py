"""Memory, predicted before a run and measured during one.

    estimate      `memory-estimate`: GPU need by phase (traced peak + cuBLAS workspaces + margins) and host RAM
    analytic      the same GPU bytes from formulas, by component
    trace         the very step training runs, on fake tensors, its live bytes counted
    host_ram      host RAM by phase: process, masters, loading, a step, a merge
    measure       the same step on a real device: CUDA counters, paged optimizer state, step and merge time
    planner       `memory-estimate --plan`: the fastest settings that fit a card, by a stated cost model
"""
