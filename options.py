"""Options declared once, as dataclass fields. option() gives a field its help text, choices, single-field
check and how it behaves on --resume; add_options turns a config dataclass's fields into argparse flags
(--foo-bar from the field foo_bar, with the class's FLAG_PREFIX, in its HELP_GROUP); check_fields and
check_flags run the single-field checks, raising InputError naming the flag (one line, exit code 2).
Checks between fields live next to the dataclass they concern (ModelConfig.check, MoEConfig.check).

A flag's `dest` (moe_capacity_factor) is its name in the trainer's Namespace and in the flat dicts that
checkpoints and config.json hold (to_flat, from_flat); an old spelling (an alias) is still accepted on the
command line, and its dest (router_aux_loss_coef) is read as the new one from dicts saved before the rename.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from errors import InputError


@dataclass(frozen=True)
class Check:
    """A single-field check: ok(value) must hold, else the error says `says` (e.g. "must be positive")."""
    ok: Callable[[Any], bool]
    says: str


POSITIVE = Check(lambda v: v > 0, "must be positive")
NON_NEGATIVE = Check(lambda v: v >= 0, "must be >= 0")
UNIT_INTERVAL = Check(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")


_FIELD_DEFAULT = object()  # Option.flag_default unset: the flag's default is the field's


@dataclass(frozen=True)
class Option:
    help: str
    choices: Optional[tuple] = None
    check: Optional[Check] = None       # every float must also be finite
    flag: Optional[str] = None          # the flag when it is not --<FLAG_PREFIX><field-name> (the design card's names)
    aliases: tuple = ()                 # old spellings, still accepted; for a boolean, "--no-..." ones set it off
    on_off: bool = False                # a boolean that also takes its old form, FLAG on|off
    changeable: bool = False            # a model field that may differ from the checkpoint's on --resume
    reported: bool = False              # named in the resume line when it differs from the checkpoint's run
    metavar: Optional[str] = None
    flag_default: Any = _FIELD_DEFAULT  # the flag's default where it is not the field's


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field that is a command-line option; the keywords are Option's."""
    return dataclasses.field(default=default, metadata={"option": Option(help, **kw)})


@dataclass(frozen=True)
class Flag:
    """One option of a config dataclass, resolved."""
    field: str     # the dataclass field: capacity_factor
    flag: str      # --moe-capacity-factor
    dest: str      # moe_capacity_factor: the Namespace attribute and the key in saved dicts
    type: type     # int, float, str or bool
    default: Any   # the flag's default
    option: Option

    def name(self, value: Any = None) -> str:
        """The flag as an error names it: a boolean by the spelling that sets `value`, with its old spelling."""
        negative = self.type is bool and value is False
        name = f"--no-{self.flag[2:]}" if negative else self.flag
        old = [a for a in self.option.aliases if self.type is not bool or a.startswith("--no-") == negative]
        return name + (f" (old spelling {', '.join(old)})" if old else "")


@functools.lru_cache(maxsize=None)
def flags(cls: type) -> tuple[Flag, ...]:
    """The options of a config dataclass in field order (a nested config's options are its own)."""
    hints = typing.get_type_hints(cls)
    prefix = getattr(cls, "FLAG_PREFIX", "")
    out = []
    for f in dataclasses.fields(cls):
        opt = f.metadata.get("option")
        if opt is None:
            continue
        flag = opt.flag or f"--{prefix}{f.name.replace('_', '-')}"
        t = hints[f.name]
        t = next(a for a in typing.get_args(t) if a is not type(None)) if typing.get_origin(t) is typing.Union else t
        default = f.default if opt.flag_default is _FIELD_DEFAULT else opt.flag_default
        out.append(Flag(f.name, flag, flag[2:].replace("-", "_"), t, default, opt))
    return tuple(out)


def flag_of(cls: type, field: str) -> Flag:
    return next(f for f in flags(cls) if f.field == field)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
def check_value(flag: Flag, value: Any) -> None:
    """The single-field checks of one option (None: not given, nothing to check)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):  # inf or nan would train NaNs
        says = "must be a finite number"
    elif flag.option.choices is not None and value not in flag.option.choices:
        says = f"must be one of {', '.join(map(str, flag.option.choices))}"
    elif flag.option.check is not None and not flag.option.check.ok(value):
        says = flag.option.check.says
    else:
        return
    raise InputError(f"{flag.name(value)} {says}, got {value}")


def check_fields(config: Any) -> None:
    """The single-field checks of a config dataclass's options (not of a nested config's)."""
    for f in flags(type(config)):
        check_value(f, getattr(config, f.field))


def check_flags(args: argparse.Namespace, cls: type) -> None:
    """The single-field checks of cls's options as parsed into args."""
    for f in flags(cls):
        check_value(f, getattr(args, f.dest))


# --------------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------------
class Switch(argparse.Action):
    """A boolean flag, --x and --no-x (argparse.BooleanOptionalAction, whose help text differs between Python
    versions); with on_off, --x also takes the value on or off (the old form of --moe-bf16-weights)."""

    def __init__(self, option_strings, dest, on_off: bool = False, **kw):
        names = [s for o in option_strings for s in (o, f"--no-{o[2:]}")]
        super().__init__(names, dest, nargs="?" if on_off else 0, metavar="on|off" if on_off else None, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        negative = option_string.startswith("--no-")
        values = values or None  # nargs 0 gives []
        if values is not None and (negative or values not in ("on", "off")):
            parser.error(f"argument {option_string}: expected {'no value' if negative else 'on, off or no value'}, "
                         f"got {values!r}")
        setattr(namespace, self.dest, not negative and values != "off")

    def format_usage(self) -> str:  # the usage line's [--x | --no-x] (argparse asks only when nargs is 0)
        return " | ".join(self.option_strings)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The defaults in the help; a Switch as --x, --no-x (its on|off value is the old form, named in its help)."""

    def _format_action_invocation(self, action):
        if isinstance(action, Switch):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """cls's options as flags in the help group cls.HELP_GROUP; their old spellings as hidden aliases."""
    group = parser.add_argument_group(cls.HELP_GROUP)
    for f in flags(cls):
        opt = f.option
        old = list(opt.aliases) + ([f"{f.flag} on|off"] if opt.on_off else [])
        help = opt.help + (f" (old spelling: {', '.join(old)})" if old else "")
        if f.type is bool:
            group.add_argument(f.flag, action=Switch, dest=f.dest, default=f.default, help=help, on_off=opt.on_off)
        else:
            group.add_argument(f.flag, dest=f.dest, type=f.type, default=f.default, choices=opt.choices, help=help,
                               metavar=opt.metavar)
        for alias in opt.aliases:  # default None: the flag's own default stands
            if f.type is bool:
                group.add_argument(alias, dest=f.dest, action="store_const", const=not alias.startswith("--no-"),
                                   default=None, help=argparse.SUPPRESS)
            else:
                group.add_argument(alias, dest=f.dest, type=f.type, choices=opt.choices, default=None,
                                   help=argparse.SUPPRESS)


def flag_defaults(classes: Iterable[type]) -> dict:
    """{dest: the flag's default} of every option of classes."""
    return {f.dest: f.default for cls in classes for f in flags(cls)}


def flag_values(args: argparse.Namespace, cls: type) -> dict:
    """{field: value} of cls's options as parsed into args."""
    return {f.field: getattr(args, f.dest) for f in flags(cls)}


# --------------------------------------------------------------------------------------------------
# Flat dicts: what checkpoints and config.json hold
# --------------------------------------------------------------------------------------------------
def _nested(field: dataclasses.Field) -> Optional[type]:
    """The config dataclass a field holds (ModelConfig.moe), or None."""
    factory = field.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def old_names(classes: Iterable[type]) -> dict:
    """{old dest: dest} of the aliases of every option of classes: router_aux_loss_coef -> moe_aux_loss_coef."""
    out = {}
    for cls in classes:
        for f in flags(cls):
            for alias in f.option.aliases:
                old = alias[2:].removeprefix("no-").replace("-", "_")
                if old != f.dest:
                    out[old] = f.dest
    return out


def renamed(d: dict, classes: Iterable[type]) -> dict:
    """d with the keys of old spellings under their new names."""
    names = old_names(classes)
    return {names.get(k, k): v for k, v in d.items()}


def to_flat(config: Any) -> dict:
    """A config as one flat dict: each option under its dest, a nested config's options beside its parent's,
    every other field under its name."""
    dests = {f.field: f.dest for f in flags(type(config))}
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if _nested(field):
            out.update(to_flat(value))
        else:
            out[dests.get(field.name, field.name)] = value
    return out


def _classes(cls: type) -> list:
    return [cls] + [c for f in dataclasses.fields(cls) if (n := _nested(f)) for c in _classes(n)]


def from_flat(cls: type, d: dict) -> Any:
    """The config that to_flat gave d (keys of old spellings read as their new names; a key missing, as in a
    dict saved before its field existed, takes the field's default). An unknown key raises ValueError."""
    d = renamed(d, _classes(cls))
    unknown = set(d) - set(to_flat(cls()))
    if unknown:
        raise ValueError(f"unknown fields {', '.join(sorted(unknown))}")
    return _build(cls, d)


def _build(cls: type, d: dict) -> Any:
    dests = {f.field: f.dest for f in flags(cls)}
    kw = {}
    for field in dataclasses.fields(cls):
        sub = _nested(field)
        if sub:
            kw[field.name] = _build(sub, d)
        elif dests.get(field.name, field.name) in d:
            kw[field.name] = d[dests.get(field.name, field.name)]
    return cls(**kw)
