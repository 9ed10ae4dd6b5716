"""What every vasipc command line shares: a parser whose errors are one line and exit 2
(options from the environment included), the value parsers of options several commands
take (`--device`, choices), and the run of a command that loads a model (`check`,
`register`, `quantize`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class EnvError(Exception):
    """A value from the environment that its option refuses; the message names the variable."""


class _EnvText(str):
    """An option's default as read from the environment (told apart from command-line text)."""


class Parser(argparse.ArgumentParser):
    """A usage line and one error line on stderr, exit code 2, no traceback; a bad value
    from the environment is the one line `PROG: error: VAR=value: why`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._env_flags: dict[str, tuple[str, str]] = {}  # dest -> (variable, its text)
        self._env_lists: dict[str, tuple[str, str, Callable]] = {}  # dest -> (.., item parser)

    def error(self, message: str):
        self.exit(2, f"usage: {self.usage}\n{self.prog}: error: {message}\n")

    def add_env_argument(self, flag: str, var: str, **kwargs: Any) -> argparse.Action:
        """An option that falls back to environment variable `var` (unset or empty: not
        given). argparse parses a string default with the option's `type` only when the
        command line leaves the option out; a value refused there, or not among `choices`
        (which argparse checks on the command line only), is an EnvError naming `var`. A
        `store_true` flag takes 1/true/yes/on or 0/false/no/off; a repeatable option
        (`action="append"`) a comma-separated list, which the command line's replaces."""
        text = os.environ.get(var) or None
        if kwargs.get("action") == "store_true":
            action = self.add_argument(flag, **kwargs)
            if text is not None:
                self._env_flags[action.dest] = (var, text)
            return action
        if kwargs.get("action") == "append":
            action = self.add_argument(flag, **kwargs)
            if text is not None:
                self._env_lists[action.dest] = (var, text, kwargs.get("type") or str)
            return action
        if text is None:
            return self.add_argument(flag, **kwargs)
        parse, choices = kwargs.get("type"), kwargs.get("choices")

        def parse_value(value: str) -> Any:
            if type(value) is not _EnvText:  # from the command line: argparse reports it
                return parse(value) if parse else value
            try:
                v = parse(str(value)) if parse else str(value)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
                raise EnvError(f"{var}={value}: {exc}") from None
            if choices is not None and v not in choices:
                raise EnvError(f"{var}={value}: invalid choice (choose from {', '.join(choices)})")
            return v
        parse_value.__name__ = getattr(parse, "__name__", "str")
        return self.add_argument(flag, **{**kwargs, "type": parse_value, "default": _EnvText(text)})

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None):
        try:
            namespace, rest = super().parse_known_args(args, namespace)
            for dest, (var, text) in self._env_flags.items():
                if not getattr(namespace, dest):  # the command line's flag wins
                    setattr(namespace, dest, env_flag(var, text))
            for dest, (var, text, parse) in self._env_lists.items():
                if getattr(namespace, dest) is None:  # the command line's list wins
                    setattr(namespace, dest, env_list(var, text, parse))
        except EnvError as exc:
            self.exit(2, f"{self.prog}: error: {exc}\n")
        return namespace, rest


def env_flag(var: str, text: str) -> bool:
    """A yes/no environment variable's value; anything else is an EnvError."""
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise EnvError(f"{var}={text}: expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")


def env_list(var: str, text: str, parse: Callable[[str], Any]) -> list:
    """A comma-separated environment variable's items, each parsed (an empty item too: a
    stray comma is an error, not a shorter list); a refused one is an EnvError."""
    try:
        return [parse(item.strip()) for item in text.split(",")]
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise EnvError(f"{var}={text}: {exc}") from None


def device(text: str) -> str:
    """`--device`: auto, cpu, cuda[:N] or gpu[:N] (checked here, resolved at start)."""
    from vasipc.runtime import parse_device

    try:
        parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def choice(what: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    """A value parser for one of `choices`, its error naming `what`."""
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid {what} {text!r} (choose from {', '.join(choices)})")
        return text
    parse.__name__ = what
    return parse


def run_command(prog: str, produce: Callable[[], Any], show: Callable[[Any], str],
                as_json: bool, errors: tuple[type[Exception], ...] = ()) -> int:
    """The exit code of a command that loads a model: its result on stdout (JSON, or
    `show`'s text), or its one-line error on stderr and 2: the command's own `errors`, a
    model or runtime refused at load, a file that cannot be written."""
    from vasipc.errors import ModelError
    from vasipc.model_yaml import ModelSourceError
    from vasipc.runtime import RuntimeUnavailable

    try:
        result = produce()
    except (*errors, ModelSourceError, ModelError, RuntimeUnavailable) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the models root cannot be written, a disk full, ...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if as_json else show(result))
    return 0
