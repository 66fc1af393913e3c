"""Config dataclasses as command-line options: each setting is defined once, as a field of its
config dataclass (SwarmConfig, TrainConfig, WorkerConfig, ...) that holds its default, with
its help (and choices) in the field's metadata:

    rounds: int = field(default=10, metadata={"help": "DiLoCo rounds when served; 0: until "
                                                      "stopped"})

`add_options(parser, Cls)` adds an option for every field whose metadata has "help":
`--kebab-name`, typed from the annotation (`X | None` as X; bool: a `--flag` when False by
default, `--flag/--no-flag` when True; a tuple: one or more values), its default the field's,
shown in the help as "(default: X)". `given(args, Cls)` returns just the settings the user
passed (each option records that it was given), so a command can lay them over defaults of its
own where it has them (`init` over the preset's TrainConfig) and otherwise let the dataclass
apply its defaults (`build(args, Cls)`). Where a command's defaults are not the dataclass's
(`add_options(..., default_help="the preset's")`) its options default to None, as any option
without a value.

The config dataclasses live with the code that uses them and importing them imports torch, so
a subcommand's parser (`CommandParser`) adds their options only when that subcommand is parsed
or its help shown: `crowdtrain --help`, `status` and the other light commands stay fast.

Metadata keys: "help" (makes the field an option; without the default, which is added),
"choices" (a constant tuple), "flag" (the option's name without "--" and the prefix; default:
the field's name in kebab case), "metavar", "parse" (turns the option's text into the value
when the command builds its settings, so a CrowdtrainError from it is the command's one-line
error, not a usage error), "default_help" (how the default reads where it is not the field's
value, e.g. "all cores" for None).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import types
import typing
from typing import Any

HELP, CHOICES, FLAG, METAVAR, PARSE, DEFAULT_HELP = (
    "help", "choices", "flag", "metavar", "parse", "default_help")


GIVEN = "_settings_given"  # in a parsed Namespace: {dest: Setting} of the options passed


@dataclasses.dataclass(frozen=True)
class Setting:
    """Where an option came from: field `name` of config dataclass `cls`."""

    cls: type
    name: str
    default_help: str | None = None  # the command's own wording of the default, if any

    @property
    def field(self) -> dataclasses.Field:
        return next(f for f in dataclasses.fields(self.cls) if f.name == self.name)


def _recording(base: type[argparse.Action]) -> type[argparse.Action]:
    """`base` (store, store_true, --flag/--no-flag) that also records, in the namespace, that
    the user gave the option."""

    class Given(base):  # type: ignore[valid-type, misc]
        setting: Setting

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.help = kwargs.get("help")  # BooleanOptionalAction appends its own default

        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            setattr(namespace, GIVEN, {**getattr(namespace, GIVEN, {}), self.dest: self.setting})

    Given.__name__ = Given.__qualname__ = f"Given{base.__name__.lstrip('_')}"
    return Given


_STORE, _STORE_TRUE, _FLAG_PAIR = map(_recording, (
    argparse._StoreAction, argparse._StoreTrueAction, argparse.BooleanOptionalAction))


def settings_of(cls: type) -> list[dataclasses.Field]:
    """The fields of config dataclass `cls` that are command-line options (they have help)."""
    return [f for f in dataclasses.fields(cls) if HELP in f.metadata]


def flag_of(f: dataclasses.Field, prefix: str = "") -> str:
    return "--" + prefix + f.metadata.get(FLAG, f.name.replace("_", "-"))


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def show_default(value: Any) -> str | None:
    """A default as the help shows it: 0.7, 1 (not 1.0), q_proj,v_proj; None: not shown."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def help_text(f: dataclasses.Field, default_help: str | None = None, prefix: str = "") -> str:
    """The option's help: the field's, then "(default: X)" from the field's default (or
    `default_help`, or the field's "default_help")."""
    shown = default_help or f.metadata.get(DEFAULT_HELP)
    if shown is None:
        default = field_default(f)
        shown = flag_of(f, prefix) if default is True else show_default(default)
    text = f.metadata[HELP] + (f" (default: {shown})" if shown else "")
    return text.replace("%", "%%")


def _value_type(annotation: Any) -> Any:
    """X for `X | None` / Optional[X]; the annotation otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                prefix: str = "", default_help: str | None = None) -> list[argparse.Action]:
    """Add an option to `parser` (or an argument group) for each field of `cls` with help.

    `prefix` goes before every flag (`lora-` gives `--lora-rank`); `default_help` says where the
    defaults come from when it is not the dataclass (e.g. "the preset's")."""
    hints = typing.get_type_hints(cls)
    actions = []
    for f in settings_of(cls):
        setting = Setting(cls, f.name, default_help)
        flag, md = flag_of(f, prefix), f.metadata
        kind = _value_type(hints[f.name])
        kw: dict[str, Any] = dict(default=None if default_help else field_default(f),
                                  help=help_text(f, default_help, prefix))
        if kind is bool:
            kw["action"] = _FLAG_PAIR if field_default(f) is True else _STORE_TRUE
        else:
            kw["action"] = _STORE
            if CHOICES in md:
                kw["choices"] = md[CHOICES]
            else:
                kw["metavar"] = md.get(METAVAR, flag[2:].replace("-", "_").upper())
            if PARSE in md:
                kw["type"] = str
            elif typing.get_origin(kind) is tuple:
                kw["type"], kw["nargs"] = typing.get_args(kind)[0], "+"
            else:
                kw["type"] = kind
        action = parser.add_argument(flag, **kw)
        action.setting = setting
        actions.append(action)
    return actions


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of `cls` the user passed on the command line, by field name."""
    out = {}
    for dest, setting in getattr(args, GIVEN, {}).items():
        if setting.cls is cls:
            value, md = getattr(args, dest), setting.field.metadata
            if PARSE in md:
                value = md[PARSE](value)
            elif isinstance(value, list):
                value = tuple(value)
            out[setting.name] = value
    return out


def build(args: argparse.Namespace, cls: type, **fixed: Any) -> Any:
    """`cls` from the settings the user passed, its own defaults for the rest, and `fixed`
    (values that are not options of their own, or that override one)."""
    return cls(**{**given(args, cls), **fixed})


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser whose settings options are added on first use (`complete`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pending: list[tuple[Any, str, dict[str, Any]]] = []

    def add_settings(self, where: Any, cls_path: str, **kw: Any) -> None:
        """Options for config dataclass `cls_path` ("package.module:Class"), added to `where`
        (this parser or one of its argument groups) by `add_options(where, Class, **kw)` when
        the parser is first used."""
        self._pending.append((where, cls_path, kw))

    def complete(self) -> CommandParser:
        """Add the pending settings options now."""
        while self._pending:
            where, cls_path, kw = self._pending.pop(0)
            module, name = cls_path.split(":")
            add_options(where, getattr(importlib.import_module(module), name), **kw)
        return self

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self.complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.complete()
        return super().format_usage()

    def format_help(self) -> str:
        self.complete()
        return super().format_help()
