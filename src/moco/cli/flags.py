"""Command-line flags generated from the typed config dataclasses, and argparse with one-line errors.

Every field of a config dataclass becomes a flag: `queue_size` -> `--queue-size VALUE`, a bool `--x/--no-x`,
a list several values; the help is the field's (see `config.opt`) with the default the command will use.
Flags not given keep that default (or, for pretraining, the preset's or the YAML file's value).
"""

import argparse
import dataclasses
import typing
from typing import Any

from ..config import coerce
from ..errors import ConfigError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the fix, and exits with status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _converter(tp: Any, name: str):
    def convert(text: str) -> Any:
        try:
            return coerce(text, tp, name)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name  # what argparse names in its own messages
    return convert


def _without_none(tp: Any) -> Any:
    """`list[float]` from `list[float] | None`; other types as they are."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(tp) and len(args) == 1 else tp


def add_fields(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, defaults: Any = None,
               skip: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass `cls` (but `skip`), its help showing `defaults`' value (default: cls())."""
    defaults = cls() if defaults is None else defaults
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, flag = hints[f.name], "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_ = f"{f.metadata.get('help', '')} (default: {_show(default)})".replace("%", "%%")  # argparse formats help
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_)
        elif typing.get_origin(listed := _without_none(tp)) is list:
            (item,) = typing.get_args(listed)
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, nargs="*", metavar="N",
                                type=_converter(item, f.name), help=help_)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                type=_converter(tp, f.name), help=help_)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def build(args: argparse.Namespace, cls: type, defaults: Any = None) -> Any:
    """An instance of `cls`: `defaults` (default: cls()) with the fields given on the command line."""
    return dataclasses.replace(cls() if defaults is None else defaults, **given(args, cls))


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return "none" if value is None else str(value)
