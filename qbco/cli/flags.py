"""`qbco train`'s flags, built from TrainConfig's fields, so that each setting is declared once: its type, its
default and its help live on the field (qbco.run.config.setting). The help states the default a plain
`qbco train` really runs: where the shipped recipe that a plain run applies (the demo's) sets another value,
both are said."""

from __future__ import annotations

import inspect
from dataclasses import MISSING, Field, fields
from typing import Any, Optional

import typer

from qbco.run.config import TrainConfig, choose_recipe, read_recipe

TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def field_type(f: Field) -> type:
    """The field's type without None (`float | None` is a float flag whose absence means None)."""
    name = str(f.type).replace(" | None", "").strip()
    if name not in TYPES:
        raise TypeError(f"TrainConfig.{f.name}: no flag type for {f.type!r}")
    return TYPES[name]


def show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def plain_run_recipe() -> tuple[str | None, dict]:
    """(name, values) of the recipe a plain `qbco train` applies (the one shipped for the default model and
    data), or (None, {})."""
    path, _ = choose_recipe(None, None, None)
    return (path.stem, read_recipe(path)) if path is not None else (None, {})


def default_help(f: Field, recipe: str | None, recipe_values: dict) -> str:
    """'(default: X)', and what a plain `qbco train` uses instead where its recipe sets the field."""
    default = f.default if f.default is not MISSING else None
    text = f.metadata.get("default_text") or show(default)
    if f.name in recipe_values and recipe_values[f.name] != default and f.name not in ("model", "data"):
        return (f"(default: {text}; a plain qbco train, on the demo, runs {show(recipe_values[f.name])} from its recipe "
                f"{recipe})")
    return f"(default: {text})"


def train_options() -> list[inspect.Parameter]:
    """One keyword parameter per TrainConfig field, each a typer option whose absence is None (so that a recipe's
    value or the field's default applies, and `given` holds only what the user typed)."""
    recipe, values = plain_run_recipe()
    options = []
    for f in fields(TrainConfig):
        flag = f.metadata.get("flag")
        declared = [flag] if flag else []
        option = typer.Option(None, *declared, help=f"{f.metadata['help']} {default_help(f, recipe, values)}")
        options.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                         annotation=Optional[field_type(f)]))
    return options
