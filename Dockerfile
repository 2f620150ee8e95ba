# syntax=docker/dockerfile:1
# One image for every hydravision process of docker-compose.yml: the Ray head with the controller, the Ray
# workers, and the sample camera's publisher.
#   CPU (default):  docker build -t hydravision .
#   CUDA:           docker build -t hydravision:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# Every node of one Ray cluster must run the same Python and Ray versions: build them together from this file,
# on bases with the same Python (both defaults are Ubuntu 24.04: Python 3.12).
ARG BASE_IMAGE=ubuntu:24.04
FROM ${BASE_IMAGE}

# The PyTorch index to take torch from: its CPU build by default (the default index would pull the CUDA one).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.4"

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
# glibc's malloc arenas: 2 (default: 8 per core), or camera processes grow as cameras come and go (pipeline/cluster.py)
ENV MALLOC_ARENA_MAX=2

# ffmpeg: the sample camera's RTSP publisher. libgl1, libglib2.0-0: OpenCV (a dependency of trackers).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ffmpeg libgl1 libglib2.0-0 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip && pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

WORKDIR /opt/hydravision
# The dependencies in a layer of their own, from pyproject.toml alone: after the code's COPY, an edit to one line
# of it downloaded and installed all of them again (~1 GB). tomllib: Python >= 3.11; on a 3.10 base (Ubuntu 22.04,
# which pyproject allows) pip's own copy of it, tomli.
COPY pyproject.toml ./
RUN python -c "import sys; t = __import__('tomllib' if sys.version_info >= (3, 11) else 'pip._vendor.tomli', \
fromlist=['load']); print(*t.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
> /tmp/requirements.txt && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY README.md ./
COPY pipeline pipeline
COPY workers workers
COPY models models
COPY synthetic synthetic
RUN pip install . && python -c "import pipeline.app, workers.stream, workers.model_runner"
COPY configs configs

# Ray writes its session files to /tmp/ray; nothing here needs root.
RUN useradd --create-home hydravision
USER hydravision
# The demo model's ONNX export in the user's cache: model.backend auto runs it on a CPU (ONNX Runtime or OpenVINO)
# without exporting at start.
RUN hydravision export
CMD ["hydravision", "--help"]
