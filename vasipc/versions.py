"""Installs a new numeric version directory of a model (`ROOT/ID/<n>/`) atomically.

The one place that adds versions (`vasipc register`, `vasipc quantize`): the files and a
`model.yaml` are written into a temporary directory beside the model's directory (a dot
name in ROOT, the same filesystem; inside ROOT/ID its creation would already touch what
a `--watch` server polls), flushed to disk and renamed into place, so a server never sees
a half-written version and reloads once. The number
is the highest version + 1; if another process renamed its own directory onto that number
meanwhile (a rename onto a non-empty directory fails), the next free one is taken.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid

from vasipc.model_yaml import version_dirs

TEMP_PREFIX = ".vasipc-install-"
# rename(2) onto a non-empty directory: ENOTEMPTY (Linux) or EEXIST (POSIX allows either);
# onto a plain file of that name, which version_dirs does not count: ENOTDIR
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR)


def _next_version(model_dir: str, after: int) -> int:
    versions = version_dirs(model_dir)
    return max(after, int(versions[-1]) if versions else 0) + 1


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(src: str, dst: str) -> None:
    """Copy the bytes (not the mode: the source may be read-only) and flush them to disk."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def _write_model_yaml(directory: str, doc: dict) -> None:
    import yaml

    with open(os.path.join(directory, "model.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(doc, f, sort_keys=False, allow_unicode=True)
        f.flush()
        os.fsync(f.fileno())


def install_version(model_dir: str, files: dict[str, str], doc: dict) -> str:
    """Install the next version of the model in `model_dir` (created if missing) and return
    its directory. `files` maps a file name in the version directory to the path to copy
    there; `doc` is the model.yaml to write, whose `model_version` is set to the number
    taken (the directory is the version). Nothing is left behind on failure."""
    for name in files:
        if name == "model.yaml" or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"install_version: {name!r} is not a plain file name other than model.yaml")
    os.makedirs(model_dir, exist_ok=True)
    parent, name = os.path.split(os.path.abspath(model_dir))
    temp = os.path.join(parent, f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex}")
    os.mkdir(temp)  # mode 0777 less the umask, as the version directory should end up
    try:
        version = _next_version(model_dir, 0)
        for name, src in files.items():
            _copy(src, os.path.join(temp, name))
        while True:
            _write_model_yaml(temp, {**doc, "model_version": str(version)})
            _fsync_dir(temp)
            target = os.path.join(model_dir, str(version))
            try:
                os.rename(temp, target)
            except OSError as exc:
                if exc.errno not in _TAKEN:
                    raise
                version = _next_version(model_dir, version)  # taken meanwhile: the next one
                continue
            _fsync_dir(model_dir)  # the rename itself survives a crash
            return target
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
