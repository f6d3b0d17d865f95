# syntax=docker/dockerfile:1
# The training job as an image. Data and checkpoints are fsspec URLs, credentials come from the
# environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, ...); arguments are Hydra overrides:
#   docker build -t upweight .
#   docker run --gpus all -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY upweight \
#     weights=seed paths.output_dir=s3://bucket/runs/seed
# BASE_IMAGE: any image with Python >= 3.10 and pip; PyTorch is taken from it when it has one
# (the default: CUDA 12.8, cuDNN 9), else installed. EXTRAS: the storage backends (and trackers:
# mlflow, wandb) to include.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies only, resolved from pyproject.toml with a stub package: this layer is rebuilt
# when the dependencies change, not on every code edit. --system-site-packages keeps the
# base image's CUDA build of torch (pip sees the requirement met and installs no other).
FROM base AS deps
ARG EXTRAS=s3,gcs
WORKDIR /build
COPY pyproject.toml ./
RUN python3 -m venv --system-site-packages /opt/venv \
    && mkdir train \
    && touch train/__init__.py README.md \
    && /opt/venv/bin/pip install --no-cache-dir ".[${EXTRAS}]" \
    && /opt/venv/bin/pip uninstall --yes upweight

# The runtime: the venv, the code and its configs, an unprivileged user.
FROM base AS runtime
COPY --from=deps /opt/venv /opt/venv
# UPWEIGHT_RUNS: where run folders go unless paths.output_dir says otherwise (mount it).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    UPWEIGHT_RUNS=/runs
RUN useradd --create-home --uid 10001 --user-group upweight \
    && mkdir /runs \
    && chown upweight:upweight /runs
WORKDIR /app
# The code with its configs (train/conf).
COPY train/ train/
USER 10001:10001
ENTRYPOINT ["python", "-m", "train"]
