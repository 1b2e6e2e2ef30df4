# syntax=docker/dockerfile:1
# GPU deployment image of `fewshot serve` (docs/deploy.md, docs/triton.md). Build from the repository root:
#   docker build -t fewshot:latest .
# CUDA, cuDNN and cuBLAS come as pip wheels with torch and onnxruntime-gpu[cuda,cudnn] (both CUDA 13),
# so the base only needs the CUDA 13 driver interface; the host needs an NVIDIA driver >= 580 and the
# NVIDIA container toolkit. Without a GPU the same image runs on the CPU (--device auto).
ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Ubuntu 24.04's Python 3.12 in a virtual environment (PEP 668 keeps pip out of the system one).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.* python3-venv=3.12.* \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/fewshot
# The wire format (generated stubs) and the client SDK first: the server depends on both.
COPY protos ./protos
COPY clients/python ./clients/python
RUN pip install ./protos/python ./clients/python
COPY pyproject.toml README.md ./
COPY fewshot ./fewshot
COPY models ./models
COPY export ./export
COPY server ./server
# Versions are pinned in pyproject.toml: torch==2.13.0 from PyPI is the CUDA build; the `gpu` extra is
# onnxruntime-gpu[cuda,cudnn] (never together with the CPU `onnxruntime`, which writes into the same
# folder); `triton` adds tritonclient.
# hadolint ignore=DL3013
RUN pip install '.[gpu,triton]' \
    && python -c "import onnxruntime, torch, tritonclient.grpc.aio, fewshot.server.app" \
    && if pip show onnxruntime >/dev/null 2>&1; then echo "the CPU onnxruntime package must not be installed" >&2; exit 1; fi
COPY --chmod=0755 deploy/entrypoint.sh deploy/healthcheck.py ./

RUN useradd --create-home --uid 1000 --user-group fewshot \
    && mkdir -p /var/lib/fewshot/bundles /var/lib/fewshot/state /var/lib/fewshot/cache \
    && chown -R fewshot:fewshot /var/lib/fewshot
ENV FEWSHOT_MODELS=/var/lib/fewshot/bundles \
    FEWSHOT_STATE_DIR=/var/lib/fewshot/state \
    FEWSHOT_CACHE=/var/lib/fewshot/cache \
    FEWSHOT_PORT=50051 \
    FEWSHOT_METRICS_PORT=9090
USER 1000:1000
VOLUME ["/var/lib/fewshot/state"]
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/fewshot/healthcheck.py"]
ENTRYPOINT ["/opt/fewshot/entrypoint.sh"]
CMD ["serve"]
