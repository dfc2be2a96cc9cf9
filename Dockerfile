# fsdp-train image: the trainer under torchrun, CPU torch by default.
#
# Online (users):  docker build -t fsdp-train:0.1.0 .
# GPU clusters:    docker build --build-arg BASE_IMAGE=<CUDA runtime image with Python 3.11> \
#                    --build-arg PIP_EXTRA_INDEX_URL=<PyTorch CUDA wheel index> -t fsdp-train:0.1.0-cuda .
# Offline:         build/wheelhouse filled on the host (hack/wheelhouse.sh) and a local base image
#                  (hack/base-image.sh): --build-arg BASE_IMAGE=fsdp-train-base:bookworm --build-arg WHEELHOUSE=1
# `make image` picks online or offline by itself.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG WHEELHOUSE=0
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY build/wheelhouse/ /wheelhouse/
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
RUN python3 -m venv /opt/fsdp-train \
 && if [ "$WHEELHOUSE" = 1 ]; then \
      /opt/fsdp-train/bin/pip install --no-index --find-links /wheelhouse /wheelhouse/fsdp_train-*.whl; \
    else \
      /opt/fsdp-train/bin/pip install ${PIP_EXTRA_INDEX_URL:+--extra-index-url "$PIP_EXTRA_INDEX_URL"} . ; \
    fi \
 && rm -rf /opt/fsdp-train/lib/python3*/site-packages/torch/include \
 && find /opt/fsdp-train -name '__pycache__' -prune -exec rm -rf {} + \
 && python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash -x '/testing/_internal/' /opt/fsdp-train/lib

# Bytecode is compiled here, once: the root filesystem is read-only at run time, and without it every
# container start (every restart of a pod) would compile torch's Python again.
FROM ${BASE_IMAGE}
RUN groupadd --gid 10001 trainer \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin trainer
COPY --from=build /opt/fsdp-train /opt/fsdp-train
ENV PATH=/opt/fsdp-train/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
# Any uid works too (OpenShift assigns one, in group 0): everything written goes to /tmp and the mounts.
USER 10001:10001
WORKDIR /tmp
# torchrun reads its rendezvous settings from PET_* variables (set by the chart or the operator).
ENTRYPOINT ["fsdp-train", "launch"]
