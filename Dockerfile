# syntax=docker/dockerfile:1
# vasipc model server, CPU image (onnxruntime). The GPU image is Dockerfile.gpu.
#
#   docker build -t vasipc:cpu .
#   docker run --rm -v "$PWD/models:/models:ro" -v /run/vasipc:/run/vasipc \
#       -v /dev/shm/vasipc:/dev/shm/vasipc vasipc:cpu \
#       --models-root /models --model-id yolov8n --frame-root /dev/shm/vasipc --socket-mode 0660
#
# No model is baked in and nothing is downloaded at run time: mount a models volume
# (MODELS_ROOT/<model-id>/[<version>/]) or derive an image that COPYs one (docs/scaling.md).
# The arguments after the image name are `python -m vasipc.serve` options; every option
# can also come from the environment as VASIPC_<OPTION>.

ARG PYTHON_VERSION=3.12

# --- build: the wheel, from the source tree, in build isolation -----------------------------
# The full python image has gcc and the libc headers; scikit-build-core's build isolation
# brings Cython, numpy, CMake and Ninja from PyPI. Same Debian release as the runtime
# below, so the extension's libc is the one it runs on (it links libc only).
FROM python:${PYTHON_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime ----------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/vasipc/bin:$PATH \
    VASIPC_SOCKET_DIR=/run/vasipc

# One uid/gid for the server in every image and manifest (deploy/kubernetes/ runs it as
# 10001:10001 with fsGroup 10001); numeric, so that Kubernetes' runAsNonRoot can check it.
# /run/vasipc (sockets) and /models are mount points.
RUN groupadd --system --gid 10001 vasipc \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin vasipc \
    && install -d -o 10001 -g 10001 -m 2770 /run/vasipc \
    && install -d -m 0755 /models

# The wheel is bind-mounted from the build stage, so it is no layer of this image; the
# `cpu` extra brings onnxruntime (never together with onnxruntime-gpu).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    set -- /wheels/vasipc-*.whl \
    && python -m venv /opt/vasipc \
    && /opt/vasipc/bin/pip install --no-cache-dir "$1[cpu]" \
    && /opt/vasipc/bin/python -c "import vasipc._fast, vasipc.server, onnxruntime"

USER 10001:10001
# Exec form: the server is PID 1 and gets SIGTERM itself (it drains, docs/contract.md 7).
ENTRYPOINT ["python", "-m", "vasipc.serve"]
CMD ["--help"]
