"""What every vasipc command line shares: a parser whose errors are one line and exit 2,
and the value parsers of options several commands take (`--device`, choices)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


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
