"""A recipe: one TOML file, one typed dataclass per section, every field documented with its unit.

    sections   the dataclasses and their rules (Recipe, ModelConfig ... CheckpointConfig, RecipeError)
    loading    TOML and --set overrides to a Recipe, every error one line naming its key

Bad input never reaches the trainer as a traceback: `load_recipe` raises `RecipeError`, which knows the key it is
about, and the command line turns it into one line and exit code 2.
"""

from lean_relora.recipe.loading import default_recipe_path, load_recipe, recipe_from_dict
from lean_relora.recipe.sections import (
                                         DTYPES,
                                         FIDELITIES,
                                         INITS,
                                         MASTER_STORES,
                                         OPTIMIZERS,
                                         QUANT_TYPES,
                                         RESETS,
                                         RESUME_SAFE,
                                         SECTIONS,
                                         CheckpointConfig,
                                         DataConfig,
                                         EvalConfig,
                                         LogConfig,
                                         LoraConfig,
                                         ModelConfig,
                                         OptimConfig,
                                         Recipe,
                                         RecipeError,
                                         ReloraConfig,
                                         TrainConfig,
)

__all__ = ["CheckpointConfig", "DTYPES", "DataConfig", "EvalConfig", "FIDELITIES", "INITS", "LogConfig",
           "LoraConfig", "MASTER_STORES", "ModelConfig", "OPTIMIZERS", "OptimConfig", "QUANT_TYPES", "RESETS",
           "RESUME_SAFE", "Recipe", "RecipeError", "ReloraConfig", "SECTIONS", "TrainConfig", "default_recipe_path",
           "load_recipe", "recipe_from_dict"]
