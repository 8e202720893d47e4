"""Turn a config dataclass into argparse arguments, and parsed arguments back into the dataclass.

Every config field carries its help text in ``field(metadata={"help": ...})``, so the CLI, the
benchmarks and the docs all describe an option in one place. Supported field types: ``int``,
``float``, ``str``, ``bool`` (``--x/--no-x``), ``Literal[...]`` (choices) and ``X | None`` of those.
A field whose type is itself such a dataclass contributes its own fields as options (flat: one
namespace of flags) and is rebuilt from them. ``metadata["aliases"]`` adds other flag spellings.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Collection
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def help_text(field: dataclasses.Field) -> str:
    return str(field.metadata.get("help", ""))


def flag_name(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        raise TypeError(f"unsupported union type {tp!r}")
    return tp, False


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    exclude: Collection[str] = (),
    required: Collection[str] = (),
) -> None:
    """Add one ``--field-name`` option per field of ``cls`` (except ``exclude``).

    Fields without a default, or named in ``required``, become required options. Defaults are
    left to the dataclass (argparse default is a sentinel) so ``dataclass_from_args`` can tell
    "not given" from "given the default value".
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        inner, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            add_dataclass_arguments(parser, inner, exclude, required)  # type: ignore[arg-type]
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text(f)}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is Literal:
            choices = typing.get_args(inner)
            kwargs["choices"] = choices
            kwargs["type"] = type(choices[0])
        elif inner in (int, float, str):
            kwargs["type"] = inner
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported type {inner!r}")
        # "default_doc" explains a computed default (a None that the config resolves later).
        default_doc = f.metadata.get("default_doc")
        if default_doc is None and f.default not in (dataclasses.MISSING, None) and inner is not bool:
            default_doc = f.default
        if default_doc is not None:
            kwargs["help"] = f"{kwargs['help']} (default: {default_doc})".strip()
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse %-formats help strings
        if not has_default or f.name in required:
            kwargs["required"] = True
        parser.add_argument(flag_name(f), *f.metadata.get("aliases", ()), **kwargs)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from parsed arguments: given options win, absent ones keep the field's
    default, ``overrides`` win over both."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init or f.name in overrides:
            continue
        inner, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            values[f.name] = dataclass_from_args(inner, args)  # type: ignore[arg-type]
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    values.update(overrides)
    return cls(**values)
