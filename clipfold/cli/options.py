"""The options every command shares, defined once: one flag name per idea, the old spellings as hidden
aliases, and defaults read from the config dataclasses (or the function that owns them) when first needed.

The words: ``--top-k`` (how many predictions or hits), ``--overwrite`` (replace what is there), ``--variant``,
``--threads``, ``--json``, ``--backend`` (the runtime that runs a graph: onnxruntime, tensorrt, ...),
``--device`` (the kind of device, cpu or gpu), ``--max-delay-ms`` (how long a batch waits to fill).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import sys
import time
from collections.abc import Callable
from typing import Any

from clipfold.errors import ConfigError


# --- defaults from where they are defined ----------------------------------------------------
class ConfigDefault:
    """The default of ``field`` of the dataclass (or parameter of the function) at ``where``
    ("module:Name" or "module:Name.method"), looked up on first use, so that building the parser imports
    no compile stack (torch). ``convert`` turns it into the option's form (e.g. bytes -> MiB)."""

    def __init__(self, where: str, field: str, convert: Callable[[Any], Any] | None = None):
        self.where, self.field, self.convert = where, field, convert

    @functools.cached_property
    def value(self) -> Any:
        module, _, name = self.where.partition(":")
        owner = functools.reduce(getattr, name.split("."), importlib.import_module(module))
        if dataclasses.is_dataclass(owner):
            found = {f.name: f for f in dataclasses.fields(owner)}[self.field]
            value = found.default_factory() if found.default is dataclasses.MISSING else found.default
        else:
            value = inspect.signature(owner).parameters[self.field].default
        if value is dataclasses.MISSING or value is inspect.Parameter.empty:
            raise LookupError(f"{self.where}.{self.field} has no default")
        return self.convert(value) if self.convert else value

    def __str__(self) -> str:  # the help's "(default %(default)s)"
        return str(self.value)

    def __repr__(self) -> str:
        return f"ConfigDefault({self.where!r}, {self.field!r})"


def default(where: str, field: str, convert: Callable[[Any], Any] | None = None) -> ConfigDefault:
    return ConfigDefault(where, field, convert)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Replace every default still pending by its value; ``args.defaulted`` names the options the user did not give."""
    defaulted = set()
    for name, value in vars(args).items():
        if isinstance(value, ConfigDefault):
            setattr(args, name, value.value)
            defaulted.add(name)
    args.defaulted = frozenset(defaulted)
    return args


def joined(values) -> str:
    return ",".join(str(v) for v in values)


# --- help ------------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their lines; an option whose default comes from a config says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action.default, ConfigDefault) and "%(default)" not in text:
            text += " (default %(default)s)"
        return text


def _examples(lines: list[str]) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def command(sub, name: str, help: str, examples: list[str], func: Callable[[argparse.Namespace], int],
            description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its examples; ``func(args)`` runs it."""
    parser = sub.add_parser(name, help=help, description=description or help, epilog=_examples(examples),
                            formatter_class=HelpFormatter)
    parser.set_defaults(func=func)
    return parser


def group(sub, name: str, help: str, examples: list[str]) -> argparse._SubParsersAction:
    """A command with subcommands (``engine build``, ``head add``, ``export triton``)."""
    parser = sub.add_parser(name, help=help, description=help, epilog=_examples(examples),
                            formatter_class=HelpFormatter)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


# --- old spellings ---------------------------------------------------------------------------
class OldSpelling(argparse.Action):
    """A hidden option kept for one release: says on stderr what to use instead, then sets the new option."""

    def __init__(self, option_strings, dest, new: str, convert: Callable[[Any], Any] | None = None, **kwargs):
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new, self.convert = new, convert

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is an old spelling (kept for one release); use {self.new}", file=sys.stderr)
        value = self.const if self.nargs == 0 else values
        setattr(namespace, self.dest, self.convert(value) if self.convert else value)


def old_spelling(parser, old: str, new: str, dest: str, **kwargs) -> None:
    parser.add_argument(old, action=OldSpelling, new=new, dest=dest, **kwargs)


def old_switch(parser, old: str, new: str, dest: str) -> None:
    old_spelling(parser, old, new, dest, nargs=0, const=True)


# --- the shared options ----------------------------------------------------------------------
def add_top_k(parser, default_value, help: str, old: str | None = None) -> None:
    parser.add_argument("--top-k", type=int, default=default_value, metavar="K", help=help)
    if old:
        old_spelling(parser, old, "--top-k", "top_k", type=int)


def add_overwrite(parser, help: str, old: str | None = None) -> None:
    parser.add_argument("--overwrite", action="store_true", help=help)
    if old:
        old_switch(parser, old, "--overwrite", "overwrite")


def add_variant(parser, help: str, repeatable: bool = False) -> None:
    parser.add_argument("--variant", action="append" if repeatable else "store", default=None, metavar="NAME",
                        help=help)


AUTO_VARIANT = ("a variant name, or auto: the fastest this CPU runs, from the bundle's profile for this CPU or a "
                "short measurement")


def add_threads(parser, help: str = "runtime threads per graph (default: every core this process may use)") -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=help)


def add_json(parser, help: str = "print JSON instead of text") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_backend(parser, help: str, default_value=None, choices=None, old: tuple[str, ...] = ()) -> None:
    """``--backend``: the runtime that runs (or that a compile builds for) a graph."""
    parser.add_argument("--backend", default=default_value, choices=choices, metavar=None if choices else "NAME",
                        help=help)
    for spelling in old:
        old_spelling(parser, spelling, "--backend", "backend", choices=choices)


def add_device(parser, help: str, old: tuple[str, ...] = ()) -> None:
    """``--device``: the kind of device something runs on (cpu or gpu)."""
    parser.add_argument("--device", default=None, choices=("cpu", "gpu"), help=help)
    for spelling in old:
        old_spelling(parser, spelling, "--device", "device", choices=("cpu", "gpu"))


def add_max_delay_ms(parser, default_value, help: str, old_us: str | None = None) -> None:
    """``--max-delay-ms``: how long the first waiting request may wait for a batch to fill."""
    parser.add_argument("--max-delay-ms", type=float, default=default_value, metavar="MS", help=help)
    if old_us:
        old_spelling(parser, old_us, "--max-delay-ms (milliseconds)", "max_delay_ms", type=int,
                     convert=lambda us: us / 1000)


def add_set(parser, help: str) -> None:
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=help)


def add_model(parser, where: str) -> None:
    parser.add_argument("--model", default=default(where, "model"), help="open_clip model name")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint path")


def add_batch_profile(parser) -> None:
    """The batch sizes of a TensorRT engine's optimization profile (BatchProfile)."""
    where = "clipfold.compile.tensorrt.build:BatchProfile"
    parser.add_argument("--min-batch", type=int, default=default(where, "min"), metavar="N",
                        help="smallest batch the engine runs")
    parser.add_argument("--opt-batch", type=int, default=default(where, "opt"), metavar="N",
                        help="batch TensorRT tunes for")
    parser.add_argument("--max-batch", type=int, default=default(where, "max"), metavar="N",
                        help="largest batch the engine runs")


# --- values ----------------------------------------------------------------------------------
def key_values(pairs: list[str] | None) -> dict[str, str]:
    """``--set KEY=VALUE`` pairs as a dict."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def floats(spec: str, flag: str, count: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in spec.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ConfigError(f"{flag} expects {count} comma-separated numbers, got {spec!r}")
    return values


def positive_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option} takes comma-separated positive integers, got {text!r}")
    return values


def progress(start: float | None = None) -> Callable[[str], None]:
    """Progress lines on stderr, with the seconds since ``start``."""
    start = time.perf_counter() if start is None else start

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say
