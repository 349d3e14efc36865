"""Options declared once: each option is a dataclass field whose metadata (``Option``) holds its
help, its choices and how the command line spells and parses it. The Python API's option
classes (``QuantConfig``, ``RunOptions``, ``FallbackOptions``, ``ImageFolder``), their checks
(``check_choices``) and the command line (``onnxq.cli.options``) all read these declarations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

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


def check_choices(instance: Any, error: type[OnnxqError] = ConfigError) -> None:
    """Refuse a value outside its option's choices, naming the choices."""
    for field, spec in declared(type(instance)):
        value = getattr(instance, field.name)
        if spec.choices and value is not None and value not in spec.choices:
            raise error(f"{label(field)} must be one of {', '.join(spec.choices)}, not {value!r}")


def model_options(instance: Any) -> dict[str, Any]:
    """The values of the options that change the quantized model (``changes_model``)."""
    return {f.name: getattr(instance, f.name) for f, spec in declared(type(instance)) if spec.changes_model}
