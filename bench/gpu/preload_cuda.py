"""Load the GPU machine's CUDA 13 pip libraries before onnxruntime-gpu is imported.

onnxruntime-gpu installed with `pip --target /tmp/site` does not find the nvidia libraries
that live in the image's own site-packages; loading them by full path with RTLD_GLOBAL lets
its CUDA provider resolve them. Imported first by bench/gpu/sitecustomize.py (bench/gpu/ on
PYTHONPATH: bench/gpu_check.sh puts it there).
"""

import ctypes
import glob
import os
import sys

import torch  # noqa: F401  (its import also makes the CUDA runtime resident)

LIBS = ["libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10",
        "libcufft.so.12", "libnvrtc.so.13", "libcudnn.so.9"]
loaded = {}
for name in LIBS:
    for sp in sys.path:
        if not sp or sp.startswith("/tmp/site") or not os.path.isdir(sp):
            continue
        hits = glob.glob(os.path.join(sp, "nvidia", "*", "lib", name))
        if hits:
            ctypes.CDLL(hits[0], mode=ctypes.RTLD_GLOBAL)
            loaded[name] = hits[0]
            break
missing = sorted(set(LIBS) - set(loaded))
if missing:
    print("preload_cuda: not found:", ", ".join(missing), file=sys.stderr)
