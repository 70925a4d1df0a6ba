"""Command-line options generated from the flows' pydantic parameter models.

Why generate them: the models in `multitag.config` are the one list of parameters (the
Prefect UI renders its form from them too), so an option written by hand is an option that
drifts: a field added to a model is reachable from `multitag tag|retrain|demo` without
touching the CLI, with its description as help text and its default shown
(tests/unit/test_cli_options.py walks every field of every model to hold that).

The mapping, one field to one option:
- a required field is a positional argument (TagParams.source);
- `bool` is `--x/--no-x`; a `Literal` lists its choices; `list[float]` takes several values
  (none at all: the empty list); any other type is parsed as JSON;
- an optional field (`int | None`) also takes `none`, which sets None (e.g. `--max-pixels none`);
- a nested model's fields get a prefix (`thresholds.policy` -> `--threshold-policy`) or
  none (`train.epochs` -> `--epochs`); a name already taken falls back to the full path
  (`--train-seed`), so no two fields ever share an option;
- an option not given leaves its field unset, so the model's own default applies.

Standard library only at import: the CLI imports this module before it knows the command,
and `multitag --help` / `multitag validate` must not pay for pydantic (`LazyParser`).
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel
    from pydantic.fields import FieldInfo

NONE_WORDS = frozenset({"none", "None", "null"})
# Names the CLI itself puts in the parsed namespace; a model field may not take them.
RESERVED_DESTS = frozenset({"command", "models_command", "func", "json", "options"})


class UsageError(SystemExit):
    """Bad command-line usage: `message`, and `usage` and `prog` of the parser that found it.

    A SystemExit with argparse's code 2, so `parse_args` keeps argparse's contract for its
    callers; `flows.cli.main` catches it to print it (and answer in JSON with --json).
    """

    def __init__(self, message: str, usage: str, prog: str) -> None:
        super().__init__(2)
        self.message = message
        self.usage = usage
        self.prog = prog


class LazyParser(argparse.ArgumentParser):
    """An argument parser that adds its options on first use and raises instead of exiting.

    Why lazy: generating a subcommand's options imports its pydantic model (~0.12 s), which
    only the subcommand that runs (or whose --help is asked for) needs. Why raise: the CLI
    decides in one place what a usage error prints and returns (exit 2; JSON with --json).
    Subparsers made by `add_subparsers` are of this class too (argparse uses the parent's).
    """

    def __init__(
        self, *args: Any, populate: Callable[[LazyParser], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def populated(self) -> LazyParser:
        """This parser with its generated options added (once)."""
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.populated()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.populated()
        return super().format_help()

    def format_usage(self) -> str:
        self.populated()
        return super().format_usage()

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message, self.format_usage(), self.prog)


class _Null:
    """What `none` on the command line parses to: set the field to None (not: leave it unset)."""

    def __repr__(self) -> str:
        return "none"


NULL = _Null()


@dataclass(frozen=True)
class Switch:
    """An extra flag that sets a field to a fixed value (`--lr-find`: train.lr = None)."""

    flag: str
    path: str
    value: Any
    help: str


@dataclass(frozen=True)
class OptionSpec:
    """How a model's options are named: kept names of earlier releases and nesting prefixes."""

    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # path -> extra flags
    switches: tuple[Switch, ...] = ()
    prefixes: Mapping[str, str] = field(default_factory=dict)  # nested field -> name prefix
    exclusive: tuple[tuple[str, ...], ...] = ()  # paths at most one of which may be given


@dataclass(frozen=True)
class FieldOption:
    """One model field's option: `path` into the model, its namespace `dest`, its flags."""

    path: tuple[str, ...]
    dest: str
    flags: tuple[str, ...]  # canonical first; empty for a positional argument


@dataclass(frozen=True)
class ModelOptions:
    """The options generated for one model, and how to read them back into that model."""

    model: type[BaseModel]
    fields: tuple[FieldOption, ...]

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The given options as the nested dict `model_validate` takes; unset ones left out."""
        data: dict[str, Any] = {}
        for opt in self.fields:
            value = getattr(args, opt.dest, None)
            if value is None:
                continue
            node = data
            for key in opt.path[:-1]:
                node = node.setdefault(key, {})
            node[opt.path[-1]] = None if value is NULL else value
        return data

    def build(self, args: argparse.Namespace) -> Any:
        """The model from the given options (raises pydantic's ValidationError)."""
        return self.model.model_validate(self.values(args))

    def option_for(self, path: str) -> FieldOption:
        wanted = tuple(path.split("."))
        return next(o for o in self.fields if o.path == wanted)


def add_model_options(
    parser: argparse.ArgumentParser, model: type[BaseModel], spec: OptionSpec | None = None
) -> ModelOptions:
    """Add one option per field of `model` (nested models' fields included) to `parser`."""
    spec = spec or OptionSpec()
    leaves = list(_leaves(model, (), spec))
    taken: set[str] = {f for a in spec.aliases.values() for f in a}
    taken |= {s.flag for s in spec.switches} | {"--json", "--help", "-h"}
    options: list[FieldOption] = []
    for path, info, preferred in sorted(leaves, key=lambda leaf: len(leaf[0])):
        name = preferred if f"--{preferred}" not in taken else "-".join(path).replace("_", "-")
        flags: tuple[str, ...] = ()
        if not info.is_required():
            flags = (f"--{name}", *spec.aliases.get(".".join(path), ()))
            if f"--{name}" in taken:
                raise ValueError(f"{model.__name__}: two fields want the option --{name}")
            taken.update(flags)
        dest = ".".join(path)
        if dest in RESERVED_DESTS:
            raise ValueError(f"{model.__name__}.{dest}: the CLI uses this name itself")
        options.append(FieldOption(path, dest, flags))
    order = {path: i for i, (path, _, _) in enumerate(leaves)}
    options.sort(key=lambda o: order[o.path])  # help lists them in the model's order
    groups: dict[str, Any] = {}
    for group in spec.exclusive:
        shared = parser.add_mutually_exclusive_group()
        groups.update(dict.fromkeys(group, shared))
    infos = {path: info for path, info, _ in leaves}
    for opt in options:
        _add_field(groups.get(opt.dest, parser), opt, infos[opt.path])
    dests = {o.dest for o in options}
    for s in spec.switches:
        if s.path not in dests:
            raise ValueError(f"{s.flag}: {model.__name__} has no field {s.path}")
        value = NULL if s.value is None else s.value
        parser.add_argument(s.flag, dest=s.path, action="store_const", const=value, help=s.help)
    return ModelOptions(model, tuple(options))


def _leaves(
    model: type[BaseModel], prefix: tuple[str, ...], spec: OptionSpec
) -> Iterable[tuple[tuple[str, ...], FieldInfo, str]]:
    """(path, field, preferred option name) of every non-model field, nested ones included."""
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        if _is_model(info.annotation):
            yield from _nested(info.annotation, path, spec)
            continue
        yield path, info, name.replace("_", "-")


def _nested(
    model: Any, path: tuple[str, ...], spec: OptionSpec
) -> Iterable[tuple[tuple[str, ...], FieldInfo, str]]:
    key = ".".join(path)
    lead = spec.prefixes.get(key, f"{key.replace('.', '-').replace('_', '-')}-")
    for leaf, info, name in _leaves(model, path, spec):
        rest = len(leaf) - len(path)
        yield leaf, info, f"{lead}{name}" if rest == 1 else name


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and hasattr(annotation, "model_fields")


def _add_field(target: Any, opt: FieldOption, info: FieldInfo) -> None:
    """Add the argparse argument for one field, typed from its annotation."""
    kind, base, optional = _shape(info.annotation)
    # `none` is accepted where it means something: an optional field whose default is not
    # None, or one whose values are not text (where "none" could be a name).
    takes_none = optional and kind != "bool" and (base is not str or info.default is not None)
    kwargs: dict[str, Any] = {"help": _help(info, kind, takes_none)}
    metavar = opt.path[-1].upper()
    if kind == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind == "choices":
        kwargs["type"] = _typed(type(base[0]), takes_none)
        kwargs["choices"] = [*base, NULL] if takes_none else list(base)
    elif kind == "list":
        kwargs.update(nargs="*", type=_typed(base, False), metavar=metavar)
    elif kind == "scalar":
        kwargs.update(type=_typed(base, takes_none), metavar=metavar)
    else:
        kwargs.update(type=_json, metavar=metavar)
    if not opt.flags:  # a required field: positional
        target.add_argument(opt.dest, **{**kwargs, "metavar": metavar})
        return
    target.add_argument(*opt.flags, dest=opt.dest, default=None, **kwargs)


def _shape(annotation: Any) -> tuple[str, Any, bool]:
    """(kind, base type or choices, optional) of a field annotation."""
    optional = False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) != 1:
            return "json", None, optional
        annotation = rest[0]
        args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "bool", bool, optional
    if origin is typing.Literal:
        return "choices", args, optional
    if origin in (list, Sequence) and len(args) == 1 and args[0] in (int, float, str):
        return "list", args[0], optional
    if annotation in (int, float, str) or (
        isinstance(annotation, type) and hasattr(annotation, "__fspath__")  # Path
    ):
        return "scalar", annotation, optional
    return "json", None, optional


def _typed(base: type, takes_none: bool) -> Callable[[str], Any]:
    """argparse `type=` for `base`, mapping `none` to NULL when the field may be None."""

    def parse(text: str) -> Any:
        if takes_none and text in NONE_WORDS:
            return NULL
        return base(text)

    parse.__name__ = base.__name__ + (" or none" if takes_none else "")
    return parse


def _json(text: str) -> Any:
    return json.loads(text)


_json.__name__ = "JSON"


def _help(info: FieldInfo, kind: str, takes_none: bool) -> str:
    """The field's description, its bounds and its default (argparse formats with %)."""
    parts = [info.description or ""]
    bounds = _bounds(info)
    if bounds:
        parts.append(f"[{bounds}]")
    if kind == "json":
        parts.append("(JSON)")
    if kind == "list":
        parts.append("(several values; none at all: the empty list)")
    if takes_none:
        parts.append("('none': None)")
    if not info.is_required():
        parts.append(f"(default: {_shown(info)})")
    return " ".join(p for p in parts if p).replace("%", "%%")


def _bounds(info: FieldInfo) -> str:
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    found = []
    for item in info.metadata:
        for attr, sign in signs.items():
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{sign} {value}")
    return ", ".join(found)


def _shown(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(str(v) for v in value) or "[]"
    return str(value)
