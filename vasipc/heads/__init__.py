"""Model families behind one seam: which family a model is, and its `Head`.

Each family is one module here with `ARCHITECTURE`, `TASKS`, `PREPROCESS` (its default
input transform), `recognize(facts)` (from ONNX metadata and tensor names, without
running the model) and `build(facts, task, output_shapes, preprocess)`; a family with
inputs besides the image has `extra_inputs(facts, batch_size)`. model.yaml's
`architecture:` / `task:` win over recognition. Anything unrecognized is refused at load.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from vasipc.errors import ModelError
from vasipc.heads import classify, dfine, rfdetr, rtdetr, yolo, yolo_end2end, yolov5
from vasipc.heads.base import ARCHITECTURES, TASKS, Declared, Head, ModelFacts, TensorFacts
from vasipc.preprocess import Preprocess

__all__ = ["ARCHITECTURES", "TASKS", "Declared", "Family", "Head", "ModelFacts", "TensorFacts",
           "family_for"]

# Recognition order: the most specific marks first (a bare one-output file is `yolo` last).
FAMILIES: tuple[ModuleType, ...] = (dfine, rfdetr, classify, yolo_end2end, rtdetr, yolov5, yolo)
BY_ARCHITECTURE = {f.ARCHITECTURE: f for f in FAMILIES}
assert tuple(sorted(BY_ARCHITECTURE)) == tuple(sorted(ARCHITECTURES))


class Family:
    """A model's family, task and input transform, decided before it runs."""

    def __init__(self, module: ModuleType, facts: ModelFacts, task: str, preprocess: Preprocess) -> None:
        self.module, self.facts, self.task, self.preprocess = module, facts, task, preprocess
        self.architecture: str = module.ARCHITECTURE
        self._extra_inputs = getattr(module, "extra_inputs", None)
        self._feeds: dict[int, dict[str, np.ndarray]] = {}  # by batch size, made once

    def extra_inputs(self, size: int) -> dict[str, np.ndarray]:
        """Inputs besides the image for a run of `size` images (D-FINE's target sizes)."""
        if self._extra_inputs is None:
            return {}
        feeds = self._feeds.get(size)
        if feeds is None:  # two threads may both make it: the same value
            feeds = self._feeds[size] = self._extra_inputs(self.facts, size)
        return feeds

    def build(self, shapes: list[tuple[int, ...]]) -> Head:
        """The head for these output shapes (a probe run's), or ModelError."""
        return self.module.build(self.facts, self.task, shapes, self.preprocess)


def family_for(facts: ModelFacts) -> Family:
    declared = facts.declared
    if declared.architecture is not None:
        module = BY_ARCHITECTURE[declared.architecture]
    else:
        module = next((f for f in FAMILIES if f.recognize(facts)), None)
        if module is None:
            raise facts.refuse("no supported family matches its metadata and outputs")
    task = declared.task or facts.meta_task or module.TASKS[0]
    if task not in module.TASKS:
        raise facts.refuse(f"architecture {module.ARCHITECTURE} has no task {task!r} "
                           f"(it has {', '.join(module.TASKS)})")
    facts.image_input()  # one NCHW image input, or refused
    try:
        preprocess = (module.PREPROCESS if declared.preprocess is None
                      else Preprocess.from_mapping(declared.preprocess, module.PREPROCESS))
    except ValueError as exc:
        raise ModelError(f"{facts.path}: model.yaml {'; '.join(str(exc).splitlines())}") from None
    return Family(module, facts, task, preprocess)
