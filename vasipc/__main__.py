"""`vasipc COMMAND ...` (the console script) and `python -m vasipc COMMAND ...`.

Commands: `check DIR` validates a model without serving it (vasipc.check); `register SRC
--models-root ROOT` checks one and installs it as the next version (vasipc.register);
`quantize MODEL_DIR --calibration FRAMES_DIR` installs an INT8 version of one
(vasipc.quantize); `serve ...` runs the server (vasipc.serve, the same as `python -m
vasipc.serve`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {"check": "vasipc.check", "quantize": "vasipc.quantize", "register": "vasipc.register",
            "serve": "vasipc.serve"}
USAGE = ("usage: vasipc {check,quantize,register,serve} ...  (vasipc check DIR --help, "
         "vasipc quantize --help, vasipc register --help, vasipc serve --help)")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    if not args or args[0] not in COMMANDS:
        got = f"unknown command {args[0]!r}" if args else "a command is required"
        print(f"{USAGE}\nvasipc: error: {got}", file=sys.stderr)
        sys.exit(2)  # a bad command line, as the commands' own
    importlib.import_module(COMMANDS[args[0]]).main(args[1:])


if __name__ == "__main__":
    main()
