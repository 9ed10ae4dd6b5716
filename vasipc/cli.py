"""What every vasipc command line shares: a parser whose errors are one line and exit 2,
the value parsers of options several commands take (`--device`, choices), and the run of
a command that loads a model (`check`, `register`, `quantize`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


class Parser(argparse.ArgumentParser):
    """A usage line and one error line on stderr, exit code 2, no traceback."""

    def error(self, message: str):
        self.exit(2, f"usage: {self.usage}\n{self.prog}: error: {message}\n")


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
