import math

import pytest

from lean_relora.training.schedule import JaggedCosine


def cosine(step, s: JaggedCosine):
    progress = (step - s.warmup_steps) / (s.max_steps - s.warmup_steps)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULE = JaggedCosine(max_steps=1000, warmup_steps=50, min_lr_ratio=0.1, restart_every=200,
                        restart_warmup_steps=20)


def test_first_warmup_is_linear_from_zero():
    assert SCHEDULE(0) == 0.0
    assert SCHEDULE(25) == pytest.approx(0.5)
    assert SCHEDULE(50) == pytest.approx(1.0)


def test_mid_cycle_follows_the_global_cosine_down_to_min_ratio():
    assert SCHEDULE(150) == pytest.approx(cosine(150, SCHEDULE))
    assert SCHEDULE(525) == pytest.approx(0.55)  # half-way through the decay
    assert SCHEDULE(999) == pytest.approx(0.1, abs=1e-4)


@pytest.mark.parametrize("restart", [200, 400, 600, 800])
def test_lr_drops_to_zero_at_each_restart_and_rewarms_linearly(restart):
    assert SCHEDULE.is_restart(restart) and not SCHEDULE.is_restart(restart + 1)
    assert SCHEDULE(restart - 1) == pytest.approx(cosine(restart - 1, SCHEDULE))
    assert SCHEDULE(restart) == 0.0
    assert SCHEDULE(restart + 10) == pytest.approx(0.5 * cosine(restart + 10, SCHEDULE))
    assert SCHEDULE(restart + 20) == pytest.approx(cosine(restart + 20, SCHEDULE))


def test_restart_points_and_countdown():
    assert [s for s in range(1000) if SCHEDULE.is_restart(s)] == [200, 400, 600, 800]
    assert SCHEDULE.steps_to_restart(0) == 200 and SCHEDULE.steps_to_restart(399) == 1


def test_warm_start_shifts_cycles_and_rewarms_when_lora_begins():
    s = JaggedCosine(max_steps=1000, warmup_steps=50, min_lr_ratio=0.1, restart_every=200,
                     restart_warmup_steps=20, warm_start_steps=100)
    assert [t for t in range(1000) if s.is_restart(t)] == [300, 500, 700, 900]
    assert s(99) == pytest.approx(cosine(99, s))  # full-rank phase: plain schedule
    assert s(100) == 0.0 and s(110) == pytest.approx(0.5 * cosine(110, s))  # LoRA begins: re-warm
    assert s.steps_to_restart(100) == 200
