"""Command-line options generated from the declarations (``onnxq.options``): each declared field
of an option class becomes a typer option with its help, choices, flag and default, so the
command line and the Python API cannot disagree. Commands share groups of them (``with_options``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from onnxq.errors import OnnxqError
from onnxq.options import Option, declared

ModelArgument = Annotated[Path, typer.Argument(help="Float ONNX model.")]
OutputOption = Annotated[Path, typer.Option("--output", "-o", help="Where to write the int8 model.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no table.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def fail(exc: Exception) -> typing.NoReturn:
    """Exit 2 with one line for bad input (an ``OnnxqError``), 1 for anything else (a bug)."""
    if isinstance(exc, OnnxqError):
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"internal error ({type(exc).__name__}): {exc}; please report this as a bug", err=True)
    raise typer.Exit(1)


def _value_type(annotation: Any) -> type:
    """The plain type of a field's annotation: ``int | None`` -> int, ``str | Callable`` -> str."""
    if typing.get_origin(annotation) is typing.Literal:
        return str
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _value_type(args[0])
    return typing.get_origin(annotation) or annotation


def _shown(default: Any) -> str | bool:
    if default is None:
        return False
    if isinstance(default, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) or False
    return str(default)


@functools.cache
def _choice_type(name: str, choices: tuple[str, ...]) -> type[enum.Enum]:
    """A str enum of ``choices`` (typer lists them in --help and refuses others)."""
    return enum.Enum(name, {choice: choice for choice in choices}, type=str)


def _parameter(field: dataclasses.Field, spec: Option, annotation: Any, panel: str) -> inspect.Parameter:
    """The typer parameter of one declared field."""
    kind = _value_type(annotation)
    flag = spec.flag or "--" + field.name.replace("_", "-")
    default = field.default
    info: dict[str, Any] = {"help": spec.help, "rich_help_panel": panel}
    if spec.choices:
        cli_type = _choice_type(field.name.title().replace("_", ""), spec.choices)
        default = None if default is None else cli_type(default)
    elif kind is bool:  # off by default: just --name; on by default: --name/--no-name
        cli_type = bool
        if spec.flag is None and default:
            flag = f"{flag}/--no-{flag[2:]}"
    elif spec.parse is not None:
        cli_type, default, info["show_default"] = Optional[str], None, _shown(field.default)
    elif kind is tuple:
        cli_type, default = Optional[list[str]], None
    else:
        cli_type = kind
    if default is None:
        cli_type = Optional[cli_type] if typing.get_origin(cli_type) is not typing.Union else cli_type
        info.setdefault("show_default", False)
    annotated = Annotated[cli_type, typer.Option(flag, **info)]
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotated)


@dataclasses.dataclass(frozen=True)
class OptionGroup:
    """The declared options of ``cls`` offered on a command, under ``panel`` in --help
    (``only``: just these fields)."""

    cls: type
    panel: str
    only: tuple[str, ...] | None = None

    def fields(self) -> list[tuple[dataclasses.Field, Option]]:
        return [(f, s) for f, s in declared(self.cls) if s.cli and (self.only is None or f.name in self.only)]

    def parameters(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.cls)
        return [_parameter(field, spec, hints[field.name], self.panel) for field, spec in self.fields()]

    def values(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The group's values taken out of the command's ``arguments``, parsed; unset ones
        (``None``) are left out so that the class's defaults apply."""
        values = {}
        for field, spec in self.fields():
            value = arguments.pop(field.name)
            if value is None:
                continue
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, list):
                value = tuple(value)
            values[field.name] = spec.parse(value) if spec.parse is not None else value
        return values


def with_options(**groups: OptionGroup) -> Callable[[Callable], Callable]:
    """Give a command the options of ``groups``: each group's values reach the command as a
    dict under the group's name (a bad value exits 2 before the command runs)."""

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name not in groups]
        added = [p for group in groups.values() for p in group.parameters()]
        names = [p.name for p in own + added]
        if len(set(names)) != len(names):
            raise TypeError(f"{command.__name__}: two options share a name in {sorted(names)}")

        @functools.wraps(command)
        def wrapper(**arguments: Any) -> Any:
            try:
                values = {name: group.values(arguments) for name, group in groups.items()}
            except Exception as exc:  # noqa: BLE001 - mapped to exit codes 2 / 1
                fail(exc)
            return command(**arguments, **values)

        wrapper.__signature__ = inspect.Signature(own + added)
        del wrapper.__wrapped__  # typer reads the signature above, not the command's
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate
