"""Every Python process started with bench/gpu/ on PYTHONPATH (bench/gpu_check.sh on the GPU
machine: tests, servers, benchmarks) loads the CUDA libraries before anything imports
onnxruntime-gpu."""

import preload_cuda  # noqa: F401
