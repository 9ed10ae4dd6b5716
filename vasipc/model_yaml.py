"""Where the model comes from: --model, --model-dir (model.yaml) or --models-root.

The one place that reads `model.yaml` (the original onboarding format, docs/contract.md 8):
`model_id`, `model_name`, `model_version`, `model_weights`, `confidence_threshold`,
`nms_iou_threshold`, `expected_resolution`, `output_schema.class_names_file` /
`output_schema.classes` (a class count, or the names by id),
`resource_requirements.gpu_required` / `cpu_fallback_allowed`, `weights_sha256` (checked
against the weights every time the source is read), `source` (informational: where
`vasipc register` got the model, or the version `vasipc quantize` quantized),
`quantization_report` (informational: `vasipc quantize`'s agreement figures), and for
models without Ultralytics metadata `architecture`, `task`, `preprocess`, `keypoint_names`, `skeleton`
(docs/contract.md 6), and how to serve it: `backend`, `precision` (under the command
line's `--backend`, `--precision`). Every problem is one
`ModelSourceError` line naming the file and the key; what can only be checked against the
loaded model (the class count and names, `expected_resolution` against the input size) is
checked by `model.load_model`, from the `ModelSpec` that `model_spec` builds. Keys the
format does not have, and entries of a versions directory that are not versions, are
named (`ignored_keys`, `ignored_versions`), not refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from vasipc.backends import BACKENDS, PRECISIONS, choose_backend
from vasipc.heads import ARCHITECTURES, TASKS, Declared
from vasipc.model import CLASSES_SOURCE, ModelSpec
from vasipc.preprocess import KEYS

if TYPE_CHECKING:
    from vasipc.runtime import Device

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")  # \Z: "$" would allow a trailing newline
# ASCII digits only: str.isdigit() also takes "²", which int() then refuses
VERSION_RE = re.compile(r"^[0-9]+\Z")
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}\Z")
KNOWN_KEYS = frozenset({
    "model_id", "model_name", "model_version", "model_weights", "weights_sha256", "confidence_threshold",
    "nms_iou_threshold", "expected_resolution", "output_schema", "resource_requirements",
    "architecture", "task", "preprocess", "keypoint_names", "skeleton", "source",
    "backend", "precision", "quantization_report"})
KNOWN_SUBKEYS = {"output_schema": frozenset({"class_names_file", "classes"}),
                 "resource_requirements": frozenset({"gpu_required", "cpu_fallback_allowed"})}
HASH_CHUNK_BYTES = 1 << 20


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
    expected_resolution: tuple[int, int] | None = None  # (width, height): must be the model's
    ignored_keys: tuple[str, ...] = ()  # model.yaml keys this format does not have (typos?)
    ignored_versions: tuple[str, ...] = ()  # non-numeric directories beside the versions
    classes: int | tuple[str, ...] | None = None  # output_schema.classes: count or names
    backend: str | None = None    # the runtime to serve with (the CLI's --backend wins)
    precision: str | None = None  # the precision to serve at (the CLI's --precision wins)
    declared: Declared = field(default_factory=Declared)  # architecture, task, preprocess, keypoints


def _show(value: Any) -> str:
    """A value for a one-line message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_labels(path: str, what: str = "labels file") -> tuple[str, ...]:
    """A labels file: one class name per line, by class id; a UTF-8 BOM and blank trailing
    lines ignored. An empty file, or a blank line between names (a class named ""), is
    refused: both are mistakes that would otherwise surface as wrong names on the wire."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [ln.strip() for ln in f]
    except OSError as exc:
        raise ModelSourceError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ModelSourceError(f"{what} {path} is not UTF-8 text") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ModelSourceError(f"{what} {path} is empty (expected one class name per line)")
    if "" in lines:
        raise ModelSourceError(f"{what} {path}: line {lines.index('') + 1} is blank "
                               "(one class name per line, by class id)")
    return tuple(lines)


def sha256_file(path: str) -> str:
    """The hex SHA-256 of a file, read 1 MiB at a time (weights can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_sha256(doc: dict, weights: str, where: str) -> None:
    """model.yaml's weights_sha256, when present, must be the weights' digest: a weights
    file replaced or damaged after it was registered is refused, not served."""
    expected = doc.get("weights_sha256")
    if expected is None:
        return
    if not isinstance(expected, str) or not SHA256_RE.match(expected):
        raise ModelSourceError(f"{where}: weights_sha256 must be 64 hex digits, got {_show(expected)}")
    try:
        actual = sha256_file(weights)
    except OSError as exc:
        raise ModelSourceError(f"cannot read {weights}: {exc.strerror or exc}") from None
    if actual != expected.lower():
        raise ModelSourceError(f"{weights} does not match {where}'s weights_sha256: expected "
                               f"{expected.lower()[:12]}..., got {actual[:12]}...")


def version_dirs(directory: str) -> list[str]:
    """The numeric version subdirectories of `directory`, lowest first; other names, and
    plain files with numeric names, are ignored."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return sorted((e for e in entries
                   if VERSION_RE.match(e) and os.path.isdir(os.path.join(directory, e))), key=int)


def other_dirs(directory: str) -> list[str]:
    """The subdirectories of a versions directory that are not versions (non-numeric names
    such as `latest` or `v2`; dot names aside), sorted."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return sorted(e for e in entries if not VERSION_RE.match(e) and not e.startswith(".")
                  and os.path.isdir(os.path.join(directory, e)))


def _only_numeric(others: list[str]) -> str:
    return f"only numeric directory names are versions, not {', '.join(others)}"


def _version_of(directory: str) -> str:
    name = os.path.basename(os.path.normpath(directory))
    return name if VERSION_RE.match(name) else "1"


def _weights(path: str, what: str) -> str:
    if os.path.isdir(path):
        raise ModelSourceError(f"{what} {path} is a directory, not an ONNX file")
    if not os.path.isfile(path):
        raise ModelSourceError(f"{what} {path} does not exist")
    if not os.access(path, os.R_OK):
        raise ModelSourceError(f"{what} {path} is not readable")
    return os.path.abspath(path)


def _single_onnx(directory: str) -> str | None:
    onnx = sorted(f for f in os.listdir(directory) if f.endswith(".onnx"))
    return onnx[0] if len(onnx) == 1 else None


def _threshold(doc: dict, key: str, where: str) -> float | None:
    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:  # NaN fails too
        raise ModelSourceError(f"{where}: {key} must be a number in [0, 1], got {_show(v)}")
    return float(v)


def _bool(section: dict, key: str, default: bool, where: str) -> bool:
    v = section.get(key, default)
    if not isinstance(v, bool):
        raise ModelSourceError(f"{where}: resource_requirements.{key} must be true or false, "
                               f"got {_show(v)}")
    return v


def _resolution(doc: dict, where: str) -> tuple[int, int] | None:
    v = doc.get("expected_resolution")
    if v is None:
        return None
    if not (isinstance(v, list) and len(v) == 2
            and all(type(x) is int and x > 0 for x in v)):  # type(): bool is an int too
        raise ModelSourceError(f"{where}: expected_resolution must be [width, height], two "
                               f"positive integers, got {_show(v)}")
    return v[0], v[1]


def _text(doc: dict, text: str, key: str, where: str) -> str | None:
    """A top-level key read as text: a string, or a number as written in the file (YAML
    reads `model_version: 1.10` as the float 1.1 and `010` as the integer 8)."""
    import yaml

    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # the same text parsed once already
        raw = [n.value for k, n in root.value if isinstance(k, yaml.ScalarNode)
               and k.value == key and isinstance(n, yaml.ScalarNode)]
        return raw[-1] if raw else str(v)  # the last, as safe_load; none: a `<<` merge key
    if not isinstance(v, str) or not v.strip():
        raise ModelSourceError(f"{where}: {key} must be a non-empty string, got {_show(v)}")
    return v


def _mapping(doc: dict, key: str, where: str) -> dict:
    v = doc.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ModelSourceError(f"{where}: {key} must be a mapping, got {_show(v)}")
    return v


def _choice(doc: dict, key: str, choices: tuple[str, ...], where: str) -> str | None:
    v = doc.get(key)
    if v is None:
        return None
    if v not in choices:
        raise ModelSourceError(f"{where}: {key} must be one of {', '.join(choices)}, got {_show(v)}")
    return v


def _declared(doc: dict, where: str) -> Declared:
    """What model.yaml says of the model's family (checked against the model at load)."""
    preprocess = doc.get("preprocess")
    if preprocess is not None and not isinstance(preprocess, dict):
        raise ModelSourceError(f"{where}: preprocess must be a mapping ({', '.join(KEYS)}), "
                               f"got {_show(preprocess)}")
    names = doc.get("keypoint_names")
    if names is not None and not (isinstance(names, list) and names
                                  and all(isinstance(n, str) and n for n in names)):
        raise ModelSourceError(f"{where}: keypoint_names must be a list of names, got {_show(names)}")
    skeleton = doc.get("skeleton")
    if skeleton is not None and not (
            isinstance(skeleton, list) and all(
                isinstance(e, list) and len(e) == 2 and all(type(i) is int and i >= 0 for i in e)
                for e in skeleton)):
        raise ModelSourceError(f"{where}: skeleton must be a list of [i, j] keypoint index "
                               f"pairs, got {_show(skeleton)}")
    return Declared(
        architecture=_choice(doc, "architecture", ARCHITECTURES, where),
        task=_choice(doc, "task", TASKS, where),
        keypoint_names=None if names is None else tuple(names),
        skeleton=None if skeleton is None else tuple((a, b) for a, b in skeleton),
        preprocess=preprocess)


def from_model_file(path: str) -> ModelSource:
    weights = _weights(path, "model file")
    stem = os.path.splitext(os.path.basename(path))[0]
    return ModelSource(weights=weights, model_id=None, model_name=stem,
                       model_version=_version_of(os.path.dirname(weights)))


def from_model_dir(directory: str) -> ModelSource:
    """A model directory: model.yaml, or else exactly one .onnx file."""
    if not os.path.isdir(directory):
        raise ModelSourceError(f"model directory {directory} does not exist")
    yaml_path = os.path.join(directory, "model.yaml")
    if not os.path.lexists(yaml_path):  # lexists: a dangling model.yaml link is an error below
        onnx = _single_onnx(directory)
        if onnx is None:
            others = other_dirs(directory)  # meant as versions? say why they are not
            raise ModelSourceError(f"{directory} has no model.yaml and not exactly one .onnx file"
                                   + (f" (nor a numeric version directory: {_only_numeric(others)})"
                                      if others and not version_dirs(directory) else ""))
        src = from_model_file(os.path.join(directory, onnx))
        return replace(src, model_version=_version_of(directory))
    return _read_model_yaml(yaml_path, directory)


def written_doc(directory: str) -> dict[str, Any]:
    """The model.yaml of a model directory as written, {} without one (for the commands
    that write a new version from it; read through `from_model_dir` first, so it is valid)."""
    import yaml

    path = os.path.join(directory, "model.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _classes(schema: dict, where: str) -> int | tuple[str, ...] | None:
    """output_schema.classes: the model's class count, or its class names by id."""
    v = schema.get("classes")
    if v is None:
        return None
    if type(v) is int and v > 0:
        return v
    if isinstance(v, list) and v and all(isinstance(n, str) and n for n in v):
        return tuple(v)
    raise ModelSourceError(f"{where}: output_schema.classes must be the class count or the "
                           f"class names by id (a list of non-empty strings), got {_show(v)}")


def _ignored_keys(doc: dict) -> tuple[str, ...]:
    """Keys (and subkeys of the format's sections) this format does not have."""
    ignored = [str(k) for k in doc if k not in KNOWN_KEYS]
    for section, known in KNOWN_SUBKEYS.items():
        if isinstance(doc.get(section), dict):
            ignored += [f"{section}.{k}" for k in doc[section] if k not in known]
    return tuple(sorted(ignored))


def _read_model_yaml(yaml_path: str, directory: str) -> ModelSource:
    import yaml

    try:
        with open(yaml_path, encoding="utf-8") as f:
            text = f.read()
        doc = yaml.safe_load(text)
    except OSError as exc:
        raise ModelSourceError(f"cannot read {yaml_path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ModelSourceError(f"{yaml_path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ModelSourceError(f"{yaml_path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise ModelSourceError(f"{yaml_path} must be a mapping of keys (model_weights: ..., "
                               f"...), got {'nothing' if doc is None else _show(doc)}")
    where = yaml_path

    def in_dir(path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(directory, path)

    weights = doc.get("model_weights")
    if weights is None:
        weights = _single_onnx(directory)
        if weights is None:
            raise ModelSourceError(f"{where}: model_weights is missing (and {directory} has "
                                   "not exactly one .onnx file to default to)")
    elif not isinstance(weights, str) or not weights.strip():
        raise ModelSourceError(f"{where}: model_weights must be a file path, got {_show(weights)}")
    weights = _weights(in_dir(weights), f"{where}: model_weights")
    _verify_sha256(doc, weights, where)

    model_id = doc.get("model_id")
    if model_id is not None and (not isinstance(model_id, str) or not MODEL_ID_RE.match(model_id)):
        raise ModelSourceError(f"{where}: model_id must be 1-64 characters of [A-Za-z0-9._-], "
                               f"got {_show(model_id)}")

    schema = _mapping(doc, "output_schema", where)
    names_file = schema.get("class_names_file")
    if names_file is not None:
        if not isinstance(names_file, str) or not names_file.strip():
            raise ModelSourceError(f"{where}: output_schema.class_names_file must be a file "
                                   f"path, got {_show(names_file)}")
        names_file = in_dir(names_file)

    res = _mapping(doc, "resource_requirements", where)
    gpu_required = _bool(res, "gpu_required", False, where)
    cpu_fallback = _bool(res, "cpu_fallback_allowed", not gpu_required, where)
    if gpu_required and cpu_fallback:
        raise ModelSourceError(f"{where}: gpu_required and cpu_fallback_allowed contradict each "
                               "other (both true)")
    name = _text(doc, text, "model_name", where)
    version = _text(doc, text, "model_version", where)
    return ModelSource(
        weights=weights,
        model_id=model_id,
        model_name=name if name is not None else os.path.splitext(os.path.basename(weights))[0],
        model_version=version if version is not None else _version_of(directory),
        class_names_file=names_file,
        confidence_threshold=_threshold(doc, "confidence_threshold", where),
        nms_iou_threshold=_threshold(doc, "nms_iou_threshold", where),
        gpu_required=gpu_required,
        cpu_fallback_allowed=cpu_fallback,
        expected_resolution=_resolution(doc, where),
        ignored_keys=_ignored_keys(doc),
        classes=_classes(schema, where),
        declared=_declared(doc, where),
        backend=_choice(doc, "backend", BACKENDS, where),
        precision=_choice(doc, "precision", PRECISIONS, where),
    )


def from_models_root(root: str, model_id: str, version: str | None) -> ModelSource:
    """DIR/<model-id>/, or its highest numeric version subdirectory (or `version`)."""
    base = os.path.join(root, model_id)
    if not os.path.isdir(base):
        raise ModelSourceError(f"{base} does not exist")
    versions, others = version_dirs(base), other_dirs(base)
    if version is None and not versions:
        return from_model_dir(base)  # the model directory itself
    if version is not None and version not in versions:
        have = f"versions {', '.join(versions)}" if versions else "no version directories"
        raise ModelSourceError(f"{base} has no version {version} ({have}"
                               + (f"; {_only_numeric(others)}" if others else "") + ")")
    source = from_model_dir(os.path.join(base, version or versions[-1]))
    return replace(source, ignored_versions=tuple(others))


def model_id_for(source: ModelSource, given: str | None = None) -> str:
    """The id callers address: `given` (--model-id), else model.yaml's model_id, else the
    weights file's stem; never model_name, which need not be a valid id (docs/contract.md 8)."""
    stem = os.path.splitext(os.path.basename(source.weights))[0]
    model_id = next(v for v in (given, source.model_id, stem) if v is not None)
    if not MODEL_ID_RE.match(model_id):
        raise ModelSourceError(f"invalid model id {model_id!r}: 1-64 characters of "
                               "[A-Za-z0-9._-] (set --model-id)")
    return model_id


def model_spec(source: ModelSource, device: Device, model_id: str, *,
               device_arg: str | None = None, labels: str | None = None,
               conf: float | None = None, iou: float | None = None,
               max_detections: int | None = None, threads: int | None = None,
               backend: str | None = None, precision: str | None = None,
               streams: int | None = None, cache_dir: str | None = None,
               preprocess: str = "auto") -> ModelSpec:
    """What to load: the command line's values (None: not given) over model.yaml's over
    ModelSpec's defaults (docs/contract.md 8). The server and `vasipc check` both build it here,
    at every load: the runtime is chosen here (`backends.choose_backend`), so a new version
    whose model.yaml asks for another precision, or which is quantized, gets its own.

    Refuses a CPU device that model.yaml's resource_requirements rule out: always with
    gpu_required, and with cpu_fallback_allowed: false when `device_arg` (--device) was
    auto and found no GPU (an explicit --device cpu is not a fallback). Reads the class
    names file (--labels over output_schema.class_names_file, over output_schema.classes'
    names); load_model checks its count, and output_schema.classes against the model (with
    --labels, which renames the classes, only its count).
    """
    if device.kind == "cpu" and source.gpu_required:
        raise ModelSourceError("model.yaml says gpu_required: true and no usable GPU is selected")
    if device.kind == "cpu" and not source.cpu_fallback_allowed and (device_arg or "auto") == "auto":
        raise ModelSourceError("model.yaml says cpu_fallback_allowed: false and --device auto "
                               "found no usable GPU (--device cpu runs it on CPU anyway)")
    names_file, what = ((labels, "labels file") if labels is not None
                        else (source.class_names_file, "output_schema.class_names_file"))
    names = read_labels(names_file, what) if names_file else None
    declared = source.classes
    if isinstance(declared, tuple) and labels is not None:
        declared = len(declared)
    names_source = f"{what} {names_file}" if names is not None else None
    if names is None and isinstance(declared, tuple):
        names, names_source = declared, CLASSES_SOURCE
    precision = precision or source.precision or "auto"
    backend = choose_backend(backend or source.backend or "auto", device, precision, preprocess,
                             source.weights)
    given = {"confidence_threshold": conf if conf is not None else source.confidence_threshold,
             "nms_iou_threshold": iou if iou is not None else source.nms_iou_threshold,
             "max_detections": max_detections, "threads": threads, "streams": streams,
             "precision": precision, "cache_dir": cache_dir}
    return ModelSpec(
        path=source.weights, model_id=model_id, model_name=source.model_name,
        model_version=source.model_version, class_names=names, class_names_source=names_source,
        expected_resolution=source.expected_resolution, declared_classes=declared,
        declared=source.declared, backend=backend,
        **{k: v for k, v in given.items() if v is not None},  # the rest: ModelSpec's defaults
    )
