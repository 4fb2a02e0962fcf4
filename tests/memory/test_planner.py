"""memory-estimate --plan: the fastest settings that fit, the tokens per optimizer step kept, every choice a trace."""

import re

import pytest
from typer.testing import CliRunner

from lean_relora.cli.app import app
from lean_relora.memory.estimate import GIB, estimate
from lean_relora.memory.planner import VERIFY_MARGIN, Settings, _Search, candidates, card_free_gib, nothing_fits, plan
from lean_relora.recipe import load_recipe

TINY = "recipes/tiny_cpu.toml"  # the suite runs from the repository root, as test_memory's do


def settings_of(recipe) -> Settings:
    return Settings(recipe.train.micro_batch_size, recipe.train.grad_accum_steps,
                    recipe.model.gradient_checkpointing, recipe.train.offload_activations,
                    recipe.train.loss_chunk_tokens, recipe.lora.train_lm_head)


def direct_need(recipe, settings: Settings) -> float:
    """What memory-estimate says the recipe with these settings needs: its own traces, nothing of the planner's."""
    return estimate(settings.apply(recipe), baseline=False).need


def test_a_card_of_n_gb_has_n_x_10_9_bytes_less_a_desktop_free():
    assert card_free_gib(24) == 22.0
    assert card_free_gib(8) == 7.1


def test_every_candidate_keeps_the_tokens_per_optimizer_step():
    recipe = load_recipe("recipes/1b3_24gb.toml")
    found = candidates(recipe)
    assert {s.micro_batch_size * s.grad_accum_steps for s in found} == {1152}
    # divisors of 1,152 up to the first micro-batch of SATURATION_TOKENS (16 x 512)
    assert sorted({s.micro_batch_size for s in found}) == [1, 2, 3, 4, 6, 8, 9, 12, 16]
    assert all(s.gradient_checkpointing for s in found if s.offload_activations)
    assert {s.train_lm_head for s in found} == {True}  # from scratch: lm_head always trains
    assert {s.train_lm_head for s in candidates(load_recipe("recipes/7b_8gb.toml"))} == {True, False}
    on_cpu = load_recipe(TINY, ["train.device='cpu'"])
    assert not any(s.offload_activations for s in candidates(on_cpu))  # a CPU has nothing to offload to


def test_the_cost_model_prices_checkpointing_at_one_more_forward():
    recipe = load_recipe("recipes/1b3_24gb.toml")
    search = _Search(recipe, 22 * GIB, 1)
    plain = Settings(16, 72, False, False, 0, True)
    full, _ = search.flops_per_token(plain, "full")
    recomputed, _ = search.flops_per_token(Settings(16, 72, True, False, 0, True), "full")
    assert 1.25 < recomputed / full <= 4 / 3  # one forward of the blocks (lm_head is not recomputed)
    relora, _ = search.flops_per_token(plain, "relora")
    assert relora < full  # the frozen base computes no weight gradients
    assert search.cost(Settings(1, 1152, False, False, 0, True)) > search.cost(plain)  # small micro-batches cost
    offloaded = Settings(16, 72, True, True, 0, True)
    assert search.cost(offloaded) > search.cost(Settings(16, 72, True, False, 0, True))


def test_on_the_tiny_recipe_the_plan_is_the_fastest_candidate_that_fits_by_a_direct_trace():
    """Every candidate traced directly (the tiny model traces in a second): the planner, which traces few, must pick
    the one an exhaustive search picks."""
    recipe = load_recipe(TINY, ["train.micro_batch_size=4", "train.grad_accum_steps=2"])
    search = _Search(recipe, 1.0, 1)
    needs = {s: direct_need(recipe, s) for s in candidates(recipe)}
    # a budget between the needs, so that the fastest candidates do not fit and slower ones do
    ordered = sorted(needs.values())
    budget = (ordered[len(ordered) // 2] + ordered[len(ordered) // 2 + 1]) / 2
    fitting = [s for s, need in needs.items() if need <= budget]
    best = min(fitting, key=lambda s: (search.cost(s), s.micro_batch_size))
    result = plan(recipe, budget / GIB)
    assert result.chosen.settings == best
    assert result.chosen.need == pytest.approx(needs[best], rel=1e-9)  # the very trace memory-estimate uses
    assert result.traces < 2 * len(needs)


def test_the_24gb_recipe_fits_22_gib_and_is_the_planners_first_choice_for_a_24_gb_card():
    recipe = load_recipe("recipes/1b3_24gb.toml")
    shipped = estimate(recipe, 24, baseline=False)
    assert [p.name for p in shipped.phases] == ["ReLoRA", "full-rank warm start"]
    assert all(p.need <= 22 * GIB for p in shipped.phases)
    twelve = load_recipe("recipes/1b3_12gb.toml")  # the same run: model, data, schedule, tokens per step
    assert recipe.model.hidden_size == twelve.model.hidden_size and recipe.relora == twelve.relora
    assert recipe.data.seq_len == twelve.data.seq_len and recipe.optim == twelve.optim
    assert (recipe.train.micro_batch_size * recipe.train.grad_accum_steps
            == twelve.train.micro_batch_size * twelve.train.grad_accum_steps)
    result = plan(recipe, card_free_gib(24))
    assert result.chosen.settings == settings_of(recipe)
    assert result.chosen.need == pytest.approx(shipped.need, rel=1e-9)
    assert_faster_ones_do_not_fit(result)


def assert_faster_ones_do_not_fit(result) -> None:
    """Each candidate ranked faster was ruled out by a real trace, or by an estimate clearly over the budget."""
    for c in result.faster:
        assert c.fits is False
        if c.source == "traced":
            assert c.need > result.budget
        else:
            assert c.need > result.budget * (1 + VERIFY_MARGIN)


# rows of README's table (the 24 GB 1.3B row is the test above)
@pytest.mark.parametrize("recipe_path, card", [("recipes/1b3_24gb.toml", 12), ("recipes/1b3_24gb.toml", 16),
                                               ("recipes/7b_8gb.toml", 8), ("recipes/7b_8gb.toml", 12),
                                               ("recipes/7b_8gb.toml", 16), ("recipes/7b_8gb.toml", 24)])
def test_a_plan_fits_by_a_direct_trace_and_the_nearest_faster_candidate_does_not(recipe_path, card):
    recipe = load_recipe(recipe_path)
    result = plan(recipe, card_free_gib(card))
    chosen = result.chosen.settings
    # the --set lines train takes give a recipe that memory-estimate, tracing it afresh, says fits
    applied = load_recipe(recipe_path, chosen.overrides())
    assert settings_of(applied) == chosen
    assert estimate(applied, baseline=False).need <= result.budget
    assert_faster_ones_do_not_fit(result)
    # the faster candidate nearest the choice, traced directly whatever the planner knew of it
    nearest = result.faster[-1]
    assert direct_need(recipe, nearest.settings) > result.budget


def test_a_13b_on_a_12_gb_card_is_refused_with_the_closest_candidate_traced():
    # README's 13B row: continued pretraining of LLaMA-2 13B's shape with the 7B recipe's settings
    sizes = ["model.hidden_size=5120", "model.intermediate_size=13824", "model.num_layers=40", "model.num_heads=40"]
    recipe = load_recipe("recipes/7b_8gb.toml", sizes)
    result = plan(recipe, card_free_gib(12))
    assert result.chosen is None and result.closest.source == "traced"
    leanest = result.closest.settings
    assert leanest.micro_batch_size == 1 and leanest.offload_activations and not leanest.train_lm_head
    assert result.closest.need > result.budget
    assert direct_need(recipe, leanest) == pytest.approx(result.closest.need, rel=1e-9)
    assert_faster_ones_do_not_fit(result)


def test_cli_plan_prints_set_lines_that_train_takes(tmp_path):
    out = CliRunner().invoke(app, ["memory-estimate", TINY, "--gpu-gb", "2", "--plan"])
    assert out.exit_code == 0, out.output
    sets = re.findall(r"^--set (\S+)$", out.output, re.MULTILINE)
    assert any(s.startswith("train.micro_batch_size=") for s in sets)
    assert not any(s.startswith("lora.train_lm_head") for s in sets)  # not searched for a run from scratch
    assert "chosen" in out.output and "lean-relora train recipes/tiny_cpu.toml --set" in out.output
    result = plan(load_recipe(TINY), 2)
    assert settings_of(load_recipe(TINY, sets)) == result.chosen.settings


def test_cli_plan_that_nothing_fits_is_one_line_saying_how_close_and_exit_2():
    out = CliRunner().invoke(app, ["memory-estimate", TINY, "--gpu-gb", "0.5", "--plan"])
    assert out.exit_code == 2
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and "nothing fits in 0.5 GiB: the closest" in lines[0] and "GiB more" in lines[0]
    result = plan(load_recipe(TINY), 0.5)
    assert result.chosen is None and result.closest.need > result.budget
    assert nothing_fits(result).split(": ", 1)[0] == "nothing fits in 0.5 GiB"


@pytest.mark.parametrize("args, message", [(["--plan"], "--plan: give the GPU memory"),
                                           (["--plan", "--gpu-gb", "0"], "--gpu-gb 0: must be > 0")])
def test_cli_plan_refuses_bad_input_in_one_line(args, message):
    out = CliRunner().invoke(app, ["memory-estimate", TINY, *args])
    assert out.exit_code == 2 and message in out.output


def test_train_gpu_gb_trains_with_the_plan_and_keeps_it_in_the_checkpoints_recipe(tmp_path):
    from helpers import TINY as TINY_TOML

    from lean_relora.training.checkpoint import saved_recipe

    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    run_dir = tmp_path / "run"
    out = CliRunner().invoke(app, ["train", str(path), "--run-dir", str(run_dir), "--max-steps", "1",
                                   "--gpu-gb", "2"])
    assert out.exit_code == 0, out.output
    planned = plan(load_recipe(path), 2).chosen.settings
    assert planned.loss_chunk_tokens == 0  # differs from the file's (the default 1024): the plan was applied
    saved = saved_recipe(run_dir / "checkpoints" / "step-00000001")
    assert settings_of(saved) == planned
    again = CliRunner().invoke(app, ["train", "--run-dir", str(run_dir), "--resume", "auto", "--gpu-gb", "2"])
    assert again.exit_code == 2 and "--gpu-gb: plans a new run" in again.output


def test_cli_plan_as_json_lists_the_chosen_settings_and_every_candidate_judged():
    import json

    out = CliRunner().invoke(app, ["memory-estimate", TINY, "--gpu-gb", "2", "--plan", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["chosen"]["fits"] and result["chosen"]["need"] <= 2 * GIB
    assert "train.micro_batch_size=8" in result["chosen"]["settings"]
    assert result["budget"] == 2 * GIB and result["traces"] >= 1
