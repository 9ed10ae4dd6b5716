"""`vasipc register SRC --models-root ROOT`: check a model and install it as its next version.

SRC is an .onnx file, a model directory (model.yaml, or one .onnx file) or an Ultralytics
PyTorch checkpoint (`.pt`, exported to ONNX here, with torch and ultralytics installed:
the server never exports). The model is checked exactly as `vasipc check` does (the same
function: loaded as the server would and run on a synthetic frame); one that fails is
refused with its one-line error, exit code 2, and nothing is installed. Otherwise
`ROOT/ID/<n>/` is installed atomically (`versions.install_version`) with the weights, the
labels file if any and a model.yaml: the source's keys, the new `model_version`,
`weights_sha256` (checked by every later load: a changed file is refused) and `source`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

PROG = "vasipc register"
USAGE = ("vasipc register SRC --models-root ROOT [--model-id ID] [--device auto|cpu|cuda[:N]] "
         "[--labels FILE] [--json]")
ONNX_OPSET = 17  # what the test zoo's Ultralytics exports use; ONNX Runtime >= 1.18 runs it
NEEDS_TORCH = ("registering a PyTorch file needs torch (and ultralytics for Ultralytics "
               "checkpoints): pip install torch ultralytics")
# keys register writes itself; every other key of the source's model.yaml is carried over
_REWRITTEN = frozenset({"model_id", "model_name", "model_version", "model_weights",
                        "weights_sha256", "output_schema", "source"})


class RegisterError(Exception):
    """A problem reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from vasipc.cli import Parser, device

    p = Parser(prog=PROG, usage=USAGE,
               description="Check a model as `vasipc check` does and install it as the next "
                           "version directory ROOT/ID/<n>/.")
    p.add_argument("src", metavar="SRC",
                   help="an .onnx file, a model directory (model.yaml or one .onnx) or an "
                        "Ultralytics .pt checkpoint")
    p.add_argument("--models-root", metavar="ROOT", required=True,
                   help="the directory of models (as the server's --models-root)")
    p.add_argument("--model-id", metavar="ID", help="default: model.yaml's, else the weights' stem")
    p.add_argument("--device", type=device, default="auto",
                   help="where the check runs: auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line (over model.yaml's)")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    return p


def export_pytorch(path: str, workdir: str) -> str:
    """Export an Ultralytics checkpoint to ONNX in `workdir` (Ultralytics writes next to the
    .pt, so a copy there is exported); the .onnx file's path. A plain PyTorch module is
    refused: it says nothing of its input size or outputs."""
    try:
        import torch  # noqa: F401  (ultralytics needs it; a missing torch gets its own message)
    except ImportError:
        raise RegisterError(NEEDS_TORCH) from None
    from vasipc.errors import first_line

    # Ultralytics logs to the stdout of its import time: kept aside, so that --json stays one
    # document and a refusal one line; an export's log goes to stderr
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        try:
            from ultralytics import YOLO
        except ImportError:
            raise RegisterError(f"{path}: only Ultralytics checkpoints can be registered (a plain "
                                "PyTorch module has no input size to export at), and reading "
                                "one needs ultralytics: pip install ultralytics") from None
        copy = os.path.join(workdir, os.path.basename(path))
        shutil.copyfile(path, copy)
        try:
            model = YOLO(copy)
        except Exception as exc:
            raise RegisterError(f"{path} is not an Ultralytics checkpoint ({first_line(exc)}); "
                                "only those can be registered from PyTorch") from None
        try:
            exported = str(model.export(format="onnx", imgsz=model.overrides.get("imgsz", 640),
                                         opset=ONNX_OPSET, dynamic=True))
        except Exception as exc:
            raise RegisterError(f"exporting {path} to ONNX failed: {first_line(exc)}") from None
    sys.stderr.write(log.getvalue())
    return exported


def register(src: str, models_root: str, *, model_id: str | None = None, device: str = "auto",
             labels: str | None = None) -> dict[str, Any]:
    """Check the model at `src` and install it under `models_root`; the report (`--json`).
    Raises RegisterError and check's errors (one line each), OSError when installing."""
    from vasipc import model_yaml as my
    from vasipc.check import check
    from vasipc.versions import install_version

    if model_id is not None and not my.MODEL_ID_RE.match(model_id):
        raise RegisterError(f"invalid model id {model_id!r}: 1-64 characters of [A-Za-z0-9._-]")
    if not os.path.exists(src):
        raise RegisterError(f"{src} does not exist")
    with tempfile.TemporaryDirectory(prefix="vasipc-register-") as work:
        path = export_pytorch(src, work) if os.path.isfile(src) and src.endswith(".pt") else src
        if os.path.isdir(path):
            versions = my.version_dirs(path)
            if versions:
                raise RegisterError(f"{path} holds version directories ({', '.join(versions)}): "
                                    "register one of them")
            source = my.from_model_dir(path)
        else:
            source = my.from_model_file(path)
        model_id = my.model_id_for(source, model_id)
        digest = my.sha256_file(source.weights)  # before the check: a later change is refused at load
        report = check(path, device=device, labels=labels, model_id=model_id)

        weights_name = os.path.basename(source.weights)
        files = {weights_name: source.weights}
        labels_file = labels or source.class_names_file
        labels_name = None
        if labels_file is not None:
            labels_name = os.path.basename(labels_file)
            if labels_name in (weights_name, "model.yaml"):
                labels_name = "class_names.txt"
            files[labels_name] = labels_file
        raw = my.written_doc(path) if os.path.isdir(path) else {}
        schema = {k: v for k, v in (raw.get("output_schema") or {}).items() if k != "class_names_file"}
        if labels_name is not None:
            schema["class_names_file"] = labels_name
        if labels is not None and isinstance(schema.get("classes"), list):
            schema["classes"] = len(schema["classes"])  # --labels renamed them: their count stays
        doc = {"model_id": model_id, "model_name": source.model_name,
               "model_version": None,  # install_version writes the number it takes
               "model_weights": weights_name, "weights_sha256": digest,
               **{k: v for k, v in raw.items() if k not in _REWRITTEN},
               **({"output_schema": schema} if schema else {}),
               "source": os.path.abspath(src)}
        directory = install_version(os.path.join(models_root, model_id), files, doc)
    return {"model_id": model_id, "model_version": os.path.basename(directory),
            "directory": os.path.abspath(directory), "weights": weights_name,
            "weights_sha256": digest, "labels": labels_name, "source": doc["source"],
            "check": report}


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vasipc.check import CheckError
    from vasipc.cli import run_command

    return run_command(PROG, lambda: register(
        args.src, args.models_root, model_id=args.model_id, device=args.device,
        labels=args.labels), lambda report: report["directory"], args.json,
        (RegisterError, CheckError))


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
