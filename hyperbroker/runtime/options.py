"""Where a command's settings come from: its flags, HYPERBROKER_* variables, a TOML file.

Every option `--some-flag` of a command can also be given as the environment variable
`HYPERBROKER_SOME_FLAG` or as the key `some-flag` of the file named by `--config` (TOML, read
with tomllib). A flag on the command line wins over the variable, the variable over the file,
the file over the built-in default (docs/operations.md, "Configuration"). In a variable, a
switch is 1/true/yes/on or 0/false/no/off, and an option of several values (repeatable, or
several after one flag) is a comma-separated list.

A bad key, a value of the wrong type or a bad variable is an OptionError (a ValueError: one
line, exit status 2 at the command line). This module knows argparse and nothing of the
commands.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ENV_PREFIX = "HYPERBROKER_"
CONFIG_KEY = "config"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
_NOT_SETTINGS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


class OptionError(ValueError):
    """A setting from the environment or a config file is wrong (one line, exit 2)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default and its environment variable."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or isinstance(action, _NOT_SETTINGS):
            return text
        if "%(default)" not in text:
            text += f" (default: {_shown(action.default)})"
        return f"{text} [env {env_name(action)}]"


def _shown(default: object) -> str:
    if default is None or default == []:
        return "none"
    if default is False:
        return "off"
    return str(default).replace("%", "%%")


def env_name(action: argparse.Action) -> str:
    """HYPERBROKER_METRICS_LISTEN for --metrics-listen."""
    flag = max(action.option_strings, key=len).lstrip("-")
    return ENV_PREFIX + flag.upper().replace("-", "_")


def settings(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The options of one parser that a variable or a config key may set."""
    for action in parser._actions:
        if action.option_strings and not isinstance(action, _NOT_SETTINGS):
            yield action


def all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from all_parsers(child)


def chosen(parser: argparse.ArgumentParser, ns: argparse.Namespace
           ) -> list[argparse.ArgumentParser]:
    """The parser and the subcommand parsers that `ns` went through, outermost first."""
    chain = [parser]
    while True:
        sub = next((a for a in chain[-1]._actions
                    if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(ns, sub.dest, None) if sub is not None and sub.dest else None
        if sub is None or name is None:
            return chain
        chain.append(sub.choices[name])


def _convert(action: argparse.Action, text: str, where: str) -> Any:
    try:
        value = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise OptionError(f"{where}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise OptionError(f"{where}: not one of {', '.join(map(str, action.choices))}")
    return value


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")


def _from_env(action: argparse.Action, text: str) -> Any:
    where = f"{env_name(action)}={text!r}"
    if action.nargs == 0:  # a switch: store_true / store_false
        if text.lower() not in _TRUE | _FALSE:
            raise OptionError(f"{where}: give 1 or 0 (true/false, yes/no, on/off)")
        on = text.lower() in _TRUE
        return on if action.const is True else not on
    if _is_list(action):
        return [_convert(action, part.strip(), where) for part in text.split(",") if part.strip()]
    return _convert(action, text, where)


def _need(kind: type | tuple[type, ...], value: object, wanted: str, where: str) -> None:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise OptionError(f"{where}: must be {wanted}, not {value!r}")


def _from_file(action: argparse.Action, value: object, where: str) -> Any:
    if action.nargs == 0:  # a switch
        _need(bool, value, "true or false", where)
        return value if action.const is True else not value
    if _is_list(action):
        _need(list, value, "a list", where)
        assert isinstance(value, list)
        return [_from_file_scalar(action, v, where) for v in value]
    return _from_file_scalar(action, value, where)


def _from_file_scalar(action: argparse.Action, value: object, where: str) -> Any:
    if action.type in (None, str, Path) or action.choices is not None:
        _need(str, value, "a string", where)
    elif action.type is int:
        _need(int, value, "an integer", where)
    else:  # float, or a function that checks a number (>= 0 ...)
        _need((int, float), value, "a number", where)
    return _convert(action, str(value), where)


def read_config(path: str, chain: Sequence[argparse.ArgumentParser]) -> dict[str, Any]:
    """The settings of the TOML file `path` for the command `chain`, by argparse dest."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"{path}: not valid TOML: {e}") from None
    known = {max(a.option_strings, key=len).lstrip("-"): a
             for p in chain for a in settings(p) if a.dest != CONFIG_KEY}
    command = chain[-1].prog
    out: dict[str, Any] = {}
    for key, value in table.items():
        action = known.get(key.replace("_", "-"))
        if action is None:
            close = difflib.get_close_matches(key, known, n=1)
            raise OptionError(f"{path}: {key!r} is not a setting of `{command}`"
                              + (f"; did you mean {close[0]!r}?" if close else
                                 f"; the keys are its flags' names ({', '.join(sorted(known))})"))
        out[action.dest] = _from_file(action, value, f"{path}: {key}")
    return out


def _set_defaults(chain: Sequence[argparse.ArgumentParser], values: Mapping[str, Any]) -> None:
    for p in chain:
        for action in settings(p):
            if action.dest in values:
                action.default = values[action.dest]
                action.required = False


def parse(parser: argparse.ArgumentParser, argv: Sequence[str],
          environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    """Parse `argv` with the defaults taken from `environ` and the --config file first."""
    env: dict[str, Any] = {}
    for p in all_parsers(parser):
        for action in settings(p):
            text = environ.get(env_name(action))
            if text is not None:
                value = _from_env(action, text)
                action.default = value
                action.required = False
                env[action.dest] = value
    required = [a for p in all_parsers(parser) for a in p._actions if a.required]
    for a in required:  # the first pass only finds the command and its --config
        if a.option_strings:
            a.required = False
    first, _ = parser.parse_known_args(argv)
    for a in required:
        a.required = True
    config = getattr(first, CONFIG_KEY, None)
    if config:
        chain = chosen(parser, first)
        file_values = read_config(str(config), chain)
        _set_defaults(chain, {k: v for k, v in file_values.items() if k not in env})
    return parser.parse_args(argv)
