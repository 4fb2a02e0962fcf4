"""The jagged cosine learning rate of ReLoRA.

A global schedule (linear warmup, then cosine from lr to lr * min_lr_ratio at max_steps), cut at every restart: the LR
drops to 0 and re-warms linearly over `restart_warmup_steps`, because the fresh LoRA factors and the pruned optimizer
state would otherwise take full-size steps on moments that no longer describe them.

Steps are counted from 0; the LR of step t is the one the optimizer uses for its (t+1)-th update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lean_relora.recipe import Recipe


@dataclass(frozen=True)
class JaggedCosine:
    max_steps: int  # optimizer steps in the run
    warmup_steps: int  # steps of the first linear warmup
    min_lr_ratio: float  # final LR as a share of the peak
    restart_every: int  # steps per ReLoRA cycle
    restart_warmup_steps: int  # steps of linear re-warm after each restart
    warm_start_steps: int = 0  # full-rank steps before the first cycle

    @classmethod
    def of(cls, recipe: Recipe) -> JaggedCosine:
        """The schedule a recipe trains with."""
        r = recipe.relora
        return cls(recipe.train.max_steps, recipe.optim.warmup_steps, recipe.optim.min_lr_ratio, r.restart_every,
                   r.restart_warmup_steps, r.warm_start_steps)

    def is_restart(self, step: int) -> bool:
        """Whether the LoRA factors are merged and re-initialised just before `step`."""
        cycle_step = step - self.warm_start_steps
        return cycle_step > 0 and cycle_step % self.restart_every == 0

    def cycle_start(self, step: int) -> int | None:
        """The step at which the current low-rank cycle began (None during the full-rank warm start or before the
        first restart of a run without warm start, when the global warmup is in charge)."""
        cycle_step = step - self.warm_start_steps
        if cycle_step < 0 or (self.warm_start_steps == 0 and cycle_step < self.restart_every):
            return None
        return step - cycle_step % self.restart_every

    def steps_to_restart(self, step: int) -> int:
        cycle_step = step - self.warm_start_steps
        if cycle_step < 0:
            return -cycle_step + self.restart_every
        return self.restart_every - cycle_step % self.restart_every

    def __call__(self, step: int) -> float:
        """LR multiplier in [0, 1] for `step`."""
        if step < self.warmup_steps:
            return step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        cosine = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        start = self.cycle_start(step)
        if start is not None and step - start < self.restart_warmup_steps:
            return cosine * (step - start) / self.restart_warmup_steps
        return cosine
