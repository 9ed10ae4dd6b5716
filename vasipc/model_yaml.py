"""Where the model comes from: --model, --model-dir (model.yaml) or --models-root.

The one place that reads `model.yaml` (the original onboarding format, CONTRACT 8):
`model_id`, `model_name`, `model_version`, `model_weights`, `confidence_threshold`,
`nms_iou_threshold`, `expected_resolution`, `output_schema.class_names_file`,
`resource_requirements.gpu_required` / `cpu_fallback_allowed`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")  # \Z: "$" would allow a trailing newline


class ModelSourceError(ValueError):
    """The model directory or file cannot be used (one line, exit code 2)."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Everything known about the model before its session exists."""

    weights: str
    model_id: str | None        # from model.yaml; the CLI's --model-id wins
    model_name: str
    model_version: str
    class_names_file: str | None = None
    confidence_threshold: float | None = None
    nms_iou_threshold: float | None = None
    gpu_required: bool = False
    cpu_fallback_allowed: bool = True


def read_labels(path: str) -> tuple[str, ...]:
    """A labels file: one class name per line, by class id; blank trailing lines ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.rstrip("\r\n") for ln in f]
    except OSError as exc:
        raise ModelSourceError(f"cannot read labels file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ModelSourceError(f"labels file {path} is not UTF-8 text") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return tuple(ln.strip() for ln in lines)


def _version_of(directory: str) -> str:
    name = os.path.basename(os.path.normpath(directory))
    return name if name.isdigit() else "1"


def _numeric_subdirs(directory: str) -> list[str]:
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return [e for e in entries if e.isdigit() and os.path.isdir(os.path.join(directory, e))]


def _threshold(doc: dict, key: str, where: str) -> float | None:
    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ModelSourceError(f"{where}: {key} must be a number in [0, 1], got {v!r}")
    return float(v)


def _bool(section: dict, key: str, default: bool, where: str) -> bool:
    v = section.get(key, default)
    if not isinstance(v, bool):
        raise ModelSourceError(f"{where}: resource_requirements.{key} must be true or false")
    return v


def from_model_file(path: str) -> ModelSource:
    if not os.path.isfile(path):
        raise ModelSourceError(f"model file {path} does not exist")
    stem = os.path.splitext(os.path.basename(path))[0]
    return ModelSource(weights=os.path.abspath(path), model_id=None, model_name=stem,
                       model_version=_version_of(os.path.dirname(os.path.abspath(path))))


def from_model_dir(directory: str) -> ModelSource:
    """A model directory: model.yaml, or else exactly one .onnx file."""
    if not os.path.isdir(directory):
        raise ModelSourceError(f"model directory {directory} does not exist")
    yaml_path = os.path.join(directory, "model.yaml")
    if not os.path.exists(yaml_path):
        onnx = sorted(f for f in os.listdir(directory) if f.endswith(".onnx"))
        if len(onnx) != 1:
            raise ModelSourceError(f"{directory} has no model.yaml and not exactly one .onnx file")
        src = from_model_file(os.path.join(directory, onnx[0]))
        return ModelSource(**{**_asdict(src), "model_version": _version_of(directory)})
    return _read_model_yaml(yaml_path, directory)


def _asdict(src: ModelSource) -> dict[str, Any]:
    return {f: getattr(src, f) for f in src.__slots__}


def _read_model_yaml(yaml_path: str, directory: str) -> ModelSource:
    import yaml

    try:
        with open(yaml_path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise ModelSourceError(f"cannot read {yaml_path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ModelSourceError(f"{yaml_path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise ModelSourceError(f"{yaml_path} must be a mapping")
    where = yaml_path
    weights = doc.get("model_weights")
    if not isinstance(weights, str) or not weights:
        onnx = sorted(f for f in os.listdir(directory) if f.endswith(".onnx"))
        if len(onnx) != 1:
            raise ModelSourceError(f"{where}: model_weights is missing")
        weights = onnx[0]
    weights = weights if os.path.isabs(weights) else os.path.join(directory, weights)
    if not os.path.isfile(weights):
        raise ModelSourceError(f"{where}: model_weights {weights} does not exist")
    model_id = doc.get("model_id")
    if model_id is not None and (not isinstance(model_id, str) or not MODEL_ID_RE.match(model_id)):
        raise ModelSourceError(f"{where}: model_id must be 1-64 characters of [A-Za-z0-9._-]")
    schema = doc.get("output_schema") or {}
    names_file = schema.get("class_names_file") if isinstance(schema, dict) else None
    if names_file is not None:
        if not isinstance(names_file, str):
            raise ModelSourceError(f"{where}: output_schema.class_names_file must be a path")
        names_file = names_file if os.path.isabs(names_file) else os.path.join(directory, names_file)
    res = doc.get("resource_requirements") or {}
    if not isinstance(res, dict):
        raise ModelSourceError(f"{where}: resource_requirements must be a mapping")
    gpu_required = _bool(res, "gpu_required", False, where)
    cpu_fallback = _bool(res, "cpu_fallback_allowed", not gpu_required, where)
    if gpu_required and cpu_fallback:
        raise ModelSourceError(f"{where}: gpu_required and cpu_fallback_allowed contradict each other")
    version = doc.get("model_version")
    name = doc.get("model_name")
    return ModelSource(
        weights=os.path.abspath(weights),
        model_id=model_id,
        model_name=str(name) if name is not None else os.path.splitext(os.path.basename(weights))[0],
        model_version=str(version) if version is not None else _version_of(directory),
        class_names_file=names_file,
        confidence_threshold=_threshold(doc, "confidence_threshold", where),
        nms_iou_threshold=_threshold(doc, "nms_iou_threshold", where),
        gpu_required=gpu_required,
        cpu_fallback_allowed=cpu_fallback,
    )


def from_models_root(root: str, model_id: str, version: str | None) -> ModelSource:
    """DIR/<model-id>/, or its highest numeric version subdirectory (or `version`)."""
    base = os.path.join(root, model_id)
    if not os.path.isdir(base):
        raise ModelSourceError(f"{base} does not exist")
    versions = _numeric_subdirs(base)
    if version is not None:
        if version not in versions:
            raise ModelSourceError(f"{base} has no version {version}")
        return from_model_dir(os.path.join(base, version))
    if versions:
        return from_model_dir(os.path.join(base, max(versions, key=int)))
    return from_model_dir(base)
