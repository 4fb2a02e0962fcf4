"""Recipes: every shipped recipe loads; each kind of bad recipe gets one exact line and no traceback."""

from pathlib import Path

import pytest
from helpers import MALFORMED

from lean_relora.recipe import SECTIONS, Recipe, RecipeError, default_recipe_path, load_recipe

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.data.seq_len <= recipe.model.max_position_embeddings


def test_the_default_is_the_tiny_cpu_recipe():
    assert default_recipe_path().name == "tiny_cpu.toml"
    assert load_recipe(None) == load_recipe(default_recipe_path())


def test_overrides_win_and_keep_toml_types():
    recipe = load_recipe(None, ["lora.rank=4", "optim.lr=3e-4", "lora.quant=int8", "data.source=corpus.txt",
                               "optim.betas=[0.9, 0.99]", "model.gradient_checkpointing=true"])
    assert recipe.lora.rank == 4 and recipe.optim.lr == 3e-4 and recipe.lora.quant == "int8"
    assert recipe.data.source == "corpus.txt" and recipe.optim.betas == [0.9, 0.99]
    assert recipe.model.gradient_checkpointing is True


def test_integers_are_accepted_for_float_fields():
    assert load_recipe(None, ["optim.lr=1"]).optim.lr == 1.0


def test_digest_changes_with_any_field():
    assert load_recipe(None).digest() != load_recipe(None, ["train.seed=1"]).digest()




@pytest.mark.parametrize("body,message", MALFORMED, ids=[m.split(":")[0] for _, m in MALFORMED])
def test_malformed_recipe_gives_one_exact_line(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value) == f"{path}: {message}"


def test_invalid_toml_names_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[lora]\nrank = = 8\n")
    with pytest.raises(RecipeError, match=r"bad.toml: not valid TOML \(.*line 2.*\); fix the syntax at that line"):
        load_recipe(path)


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(RecipeError, match="nope.toml: no such recipe file"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match=r"--set 'lora.rank': expected section.key=value"):
        load_recipe(None, ["lora.rank"])
    with pytest.raises(RecipeError, match=r"unknown key lora.rnak; did you mean 'rank'"):
        load_recipe(None, ["lora.rnak=3"])


def test_readme_documents_every_recipe_key_and_ci_runs_its_test_command():
    root = Path(__file__).parent.parent
    readme = root.joinpath("README.md").read_text()
    for section, cls in SECTIONS.items():
        assert f"**[{section}]**" in readme
        for key in cls.__dataclass_fields__:
            assert f"| `{key}` |" in readme, f"README lacks {section}.{key}"
    test_command = next(line for line in readme.splitlines() if "pytest" in line and line.startswith("python3"))
    assert test_command in root.joinpath(".ci", "run").read_text().splitlines()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_to_toml_reads_back_into_an_equal_recipe(path, tmp_path):
    recipe = load_recipe(path)
    recipe.data.source = 'odd "quoted"\tünïcode\\path\x7f\U0001F600'
    copy = tmp_path / "copy.toml"
    copy.write_text(recipe.to_toml(), encoding="utf-8")
    assert load_recipe(copy) == recipe


def test_every_field_is_documented_and_the_readme_key_tables_are_generated_from_those_docstrings():
    import dataclasses
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("recipe_keys", root / "scripts" / "recipe_keys.py")
    keys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(keys)
    for cls in SECTIONS.values():
        assert set(keys.field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls.__name__
    readme = (root / "README.md").read_text()
    assert keys.with_tables(readme) == readme, "README.md's recipe tables drifted: run python scripts/recipe_keys.py"


@pytest.mark.parametrize("override,key", [("lora.rank=0", "lora.rank"), ("data.seq_len=100000", "data.seq_len"),
                                          ("train.offload_activations=true", "train.offload_activations")])
def test_a_recipe_error_knows_the_key_it_is_about(override, key):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [override])
    assert err.value.key == key and str(err.value).startswith(f"--set {override}: ")
