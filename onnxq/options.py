"""Options declared once: each option is a dataclass field whose metadata (``Option``) holds its
help, its choices and how the command line spells and parses it. The Python API's option
classes (``QuantConfig``, ``RunOptions``, ``FallbackOptions``, ``ImageFolder``), their checks
(``check_choices``) and the command line (``onnxq.cli.options``) all read these declarations.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.errors import ConfigError, OnnxqError


@dataclasses.dataclass(frozen=True)
class Option:
    """How one option is offered: its help; its choices (checked for API callers too); its
    command-line flag when not ``--field-name`` (``--on/--off`` for a boolean pair); ``parse``,
    which turns the command line's text into the field's value; and whether it is offered on the
    command line at all. ``changes_model``: the option changes the quantized model, so it is
    recorded in the workspace manifest and a resume with another value is refused."""

    help: str
    choices: tuple[str, ...] = ()
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    cli: bool = True
    changes_model: bool = False


def option(default: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A dataclass field declared as an option (``spec``: the ``Option`` fields)."""
    return dataclasses.field(default=default, metadata={"option": Option(**spec)})


def declared(cls: type) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of dataclass ``cls`` declared as options, in declaration order."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def label(field: dataclasses.Field) -> str:
    """An option's name in messages: ``reduce_range`` -> ``reduce range``."""
    return field.name.replace("_", " ")


_KINDS: dict[Any, tuple[tuple[type, ...], str]] = {
    int: ((numbers.Integral,), "a whole number"),
    float: ((numbers.Real,), "a number"),
    str: ((str,), "text"),
    bool: ((bool, np.bool_), "true or false"),
    tuple: ((tuple, list), "a tuple"),
    Path: ((str, os.PathLike), "a path"),
    Callable: ((Callable,), "a function"),
}


def _kinds(annotation: Any) -> list[tuple[tuple[type, ...], str]] | None:
    """The accepted (types, description) of an annotation; ``None`` for any value."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [_KINDS[str]]
    if origin in (typing.Union, types.UnionType):
        parts = [_kinds(arg) for arg in typing.get_args(annotation)]
        return None if any(p is None for p in parts) else [kind for part in parts for kind in part]
    if annotation is type(None):
        return [((type(None),), "unset (None)")]
    return [_KINDS[origin or annotation]] if (origin or annotation) in _KINDS else None


def check_types(instance: Any, error: type[OnnxqError] = ConfigError) -> None:
    """Refuse a value whose type its option's annotation does not allow (``True`` is not a
    number, ``2.5`` not a whole number), naming what it must be."""
    hints = typing.get_type_hints(type(instance))
    for field, _ in declared(type(instance)):
        value, kinds = getattr(instance, field.name), _kinds(hints[field.name])
        if kinds is None:
            continue
        is_bool = isinstance(value, (bool, np.bool_))
        if not any(isinstance(value, accepted) and (not is_bool or bool in accepted) for accepted, _ in kinds):
            wanted = " or ".join(description for _, description in kinds)
            raise error(f"{label(field)} must be {wanted}, not {value!r:.60} ({type(value).__name__})")


def check_choices(instance: Any, error: type[OnnxqError] = ConfigError) -> None:
    """Refuse a value of a type its option does not allow (``check_types``), or outside its
    option's choices, naming the choices."""
    check_types(instance, error)
    for field, spec in declared(type(instance)):
        value = getattr(instance, field.name)
        if spec.choices and value is not None and value not in spec.choices:
            raise error(f"{label(field)} must be one of {', '.join(spec.choices)}, not {value!r}")


def model_options(instance: Any) -> dict[str, Any]:
    """The values of the options that change the quantized model (``changes_model``)."""
    return {f.name: getattr(instance, f.name) for f, spec in declared(type(instance)) if spec.changes_model}
