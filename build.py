#!/usr/bin/env python3
"""Developer helper for the compiled core.

    python build.py                      # in-place build: vasipc/_fast/*.so next to the sources
    python build.py --sanitize address   # same with AddressSanitizer (pytest needs LD_PRELOAD: README)
    python build.py --debug              # VASIPC_DEBUG checks, -g
    python build.py --only letterbox     # one module (repeatable)
    python build.py wheel                # a wheel in dist/
    python build.py deps cpu test bench  # pip-install the dependencies (and these extras), not vasipc

The in-place build drives CMake directly (the same CMakeLists.txt that scikit-build-core
uses for `pip install .`), so a source checkout imports without installing.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.abspath(__file__))
FAST = os.path.join(ROOT, "vasipc", "_fast")


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def inplace(args: argparse.Namespace) -> None:
    flavour = "asan" if args.sanitize else ("debug" if args.debug else "release")
    build_dir = args.build_dir or os.path.join(ROOT, "build", f"inplace-{flavour}")
    cfg = [
        "cmake", "-S", ROOT, "-B", build_dir,
        f"-DPython_EXECUTABLE={sys.executable}",
        "-DCMAKE_BUILD_TYPE=" + ("Debug" if args.debug else "Release"),
        f"-DVASIPC_SANITIZE={args.sanitize or ''}",
        f"-DVASIPC_DEBUG={'ON' if args.debug else 'OFF'}",
        f"-DVASIPC_ONLY={';'.join(args.only or [])}",
    ]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    _run(cfg)
    _run(["cmake", "--build", build_dir, "-j", str(os.cpu_count() or 2)])
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = glob.glob(os.path.join(build_dir, f"*{suffix}"))
    if not built:
        sys.exit("build.py: CMake produced no extension modules")
    for path in built:
        name = os.path.basename(path)
        if args.only and name.split(".")[0] not in args.only:
            continue
        tmp = os.path.join(FAST, name + ".tmp")
        shutil.copy2(path, tmp)
        os.replace(tmp, os.path.join(FAST, name))  # atomic: a running test never sees half a .so
        print("built", os.path.relpath(os.path.join(FAST, name), ROOT))


def wheel(args: argparse.Namespace) -> None:
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", "dist", ROOT])


def extra_requirements(extras: dict[str, list[str]], name: str) -> list[str]:
    """The requirements of extra `name`, an extra that names others (`vasipc[lint]`) expanded."""
    reqs: list[str] = []
    for req in extras[name]:
        named = re.fullmatch(r"vasipc\[([\w,\s-]+)\]", req)
        if named:
            for other in named.group(1).split(","):
                reqs += extra_requirements(extras, other.strip())
        else:
            reqs.append(req)
    return reqs


def deps(args: argparse.Namespace) -> None:
    """Install what the in-place checkout needs to run, without installing vasipc itself."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for extra in args.extras:
        reqs += extra_requirements(project["optional-dependencies"], extra)
    _run([sys.executable, "-m", "pip", "install", *reqs])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["inplace", "wheel", "deps"], default="inplace")
    p.add_argument("extras", nargs="*", help="with deps: the extras to install too")
    p.add_argument("--sanitize", metavar="KIND", help="address, undefined, ... (-fsanitize=KIND)")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--only", action="append", metavar="MODULE")
    p.add_argument("--build-dir")
    args = p.parse_args()
    {"inplace": inplace, "wheel": wheel, "deps": deps}[args.what](args)


if __name__ == "__main__":
    main()
