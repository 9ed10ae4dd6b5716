"""Check what a built wheel ships, for .ci/run's wheel stage.

    python wheel_contents.py WHEEL CHECKOUT

Every compiled module that CMake builds (vasipc/_fast/modules.cmake) is in the wheel as an
extension and as its .pyi stub, `vasipc/py.typed` is there (PEP 561: type checkers read the
stubs), and no source of the compiled core (.pyx, .pxd, .c, .h, .cmake) nor a stray
extension is. Prints the wheel's compiled modules; a problem is exit code 1 naming it.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

SOURCES = (".pyx", ".pxd", ".c", ".h", ".cmake")


def built_modules(checkout: Path) -> set[str]:
    text = (checkout / "vasipc" / "_fast" / "modules.cmake").read_text()
    return set(re.findall(r"^vasipc_module\((\w+)", text, re.MULTILINE))


def problems(names: list[str], modules: set[str]) -> list[str]:
    found: list[str] = []
    extensions = {n.split("/")[-1].split(".")[0] for n in names
                  if n.startswith("vasipc/_fast/") and n.endswith(".so")}
    stubs = {n.split("/")[-1].removesuffix(".pyi") for n in names
             if n.startswith("vasipc/_fast/") and n.endswith(".pyi")}
    found += [f"no extension for {m}" for m in sorted(modules - extensions)]
    found += [f"an extension CMake does not build: {m}" for m in sorted(extensions - modules)]
    found += [f"no stub {m}.pyi" for m in sorted(modules - stubs)]
    if "vasipc/py.typed" not in names:
        found.append("no vasipc/py.typed")
    found += [f"a source file: {n}" for n in names if n.endswith(SOURCES)]
    return found


def main() -> None:
    wheel, checkout = Path(sys.argv[1]), Path(sys.argv[2])
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    modules = built_modules(checkout)
    found = problems(names, modules)
    if found:
        sys.exit(f"{wheel.name}:\n  " + "\n  ".join(found))
    print(f"{wheel.name}: {len(modules)} compiled modules with stubs, py.typed, no sources")


if __name__ == "__main__":
    main()
