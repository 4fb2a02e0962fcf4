"""A recipe read from TOML: `section.key = value` overrides applied, types checked, and every error one line that
names the file (or the --set) it came from, the key, the value and the rule.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path

import tomllib

from lean_relora.recipe.sections import SECTIONS, Recipe, RecipeError


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a TOML recipe (None = the embedded default) and apply `section.key=value` overrides. An error about an
    overridden key names its --set rather than the file."""
    path = Path(path) if path else default_recipe_path()
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{where}: no such recipe file; pass an existing .toml path or omit it for the default")
    except IsADirectoryError:
        raise RecipeError(f"{where}: is a directory; pass a recipe .toml file or omit it for the default") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{where}: is not UTF-8 text; pass a recipe .toml file") from None
    except OSError as e:
        raise RecipeError(f"{where}: cannot be read ({e.strerror}); pass a readable recipe .toml file") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{where}: not valid TOML ({e}); fix the syntax at that line")
    origins = {}
    for item in overrides:
        origins[_apply_override(raw, item)] = f"--set {item}"
    return recipe_from_dict(raw, where, origins)


def recipe_from_dict(raw: dict, where: str = "recipe", origins: dict[str, str] | None = None) -> Recipe:
    """`origins` maps "section.key" to where its value came from when not from `where` (a --set)."""
    origins = origins or {}
    sections = {}
    for name, table in raw.items():
        if name not in SECTIONS:
            source = next((o for k, o in origins.items() if k.startswith(f"{name}.")), where)
            raise RecipeError(f"{source}: unknown section [{name}]{_did_you_mean(name, SECTIONS)}")
        if not isinstance(table, dict):
            raise RecipeError(f"{where}: {name} must be a [{name}] table, got {table!r}")
        sections[name] = _build_section(SECTIONS[name], name, table, where, origins)
    try:
        return Recipe(**sections)
    except RecipeError as e:  # a cross-field rule, about the key it carries
        raise RecipeError(f"{origins.get(e.key, where)}: {e}", e.key) from None


def default_recipe_path() -> Path:
    # A wheel carries recipes/ inside the package; a source checkout (editable install) has it beside the package.
    package = Path(__file__).resolve().parent.parent
    packaged = package / "recipes" / "tiny_cpu.toml"
    return packaged if packaged.exists() else package.parent / "recipes" / "tiny_cpu.toml"


def _build_section(cls, section: str, table: dict, where: str, origins: dict[str, str]):
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        source = origins.get(f"{section}.{key}", where)
        if key not in hints:
            raise RecipeError(f"{source}: unknown key {section}.{key}{_did_you_mean(key, hints)}")
        if not _type_ok(value, hints[key]):
            raise RecipeError(
                f"{source}: {section}.{key} = {value!r}: must be {_type_name(hints[key])}, got {type(value).__name__}"
            )
    try:
        return cls(**{k: float(v) if hints[k] is float else v for k, v in table.items()})
    except RecipeError as e:  # a field's rule, about the field it carries (sections._rule)
        key = f"{section}.{e.key}"
        raise RecipeError(f"{origins.get(key, where)}: {section}.{e}", key) from None


def _type_ok(value, hint) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    return False


def _type_name(hint) -> str:
    if typing.get_origin(hint) is list:
        return {str: "a list of strings", float: "a list of numbers"}[typing.get_args(hint)[0]]
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _apply_override(raw: dict, item: str) -> str:
    """Set the value in `raw`; returns the key it set ("section.key")."""
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. --set lora.rank=16")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word is a string: --set data.source=corpus.txt
    raw.setdefault(section, {})[name] = value
    return f"{section}.{name}"


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(options)}"


