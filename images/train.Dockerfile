# The image of the training pods (PyTorchJob / TrainJob; components/image.py TRAIN_IMAGE): CUDA torch + dinocell.
# It also holds kfp, so the train step itself can run on it (backend=local on a GPU node, `compile --local-gpus N`).
#
#   docker build -f images/train.Dockerfile -t ghcr.io/dinocell/dinocell-train:0.1.0-cuda12.8 .   (repository root)
#
# torch is the version the project tests (TORCH_VERSION, the Makefile's pin; tests/test_images.py keeps them equal),
# the CUDA 12.8 build from PyTorch's wheel index (the host driver must support CUDA 12.8: R570 or newer). The wheel
# brings its own CUDA libraries (cuBLAS, cuDNN, NCCL, ...), so the base is the plain CUDA runtime image.
# torch.compile (train.compile: true) needs a C compiler at run time: inductor builds its CPU-side C++ with g++, and
# Triton compiles its GPU launcher stub with gcc against Python.h; hence build-essential and python3-dev. The build
# ends by compiling a small function (CPU inductor, g++), so an image without a working toolchain does not build.
#
# Assumptions, not checked online (no registry or Docker engine where this file was written): the base tag
# nvidia/cuda:12.8.1-runtime-ubuntu24.04 exists, and download.pytorch.org/whl/cu128 serves torch 2.13.0. If that
# release dropped CUDA 12.8, build the CUDA 13.0 variant (driver R580 or newer):
#   docker build --build-arg CUDA_BASE=13.0.1-runtime-ubuntu24.04 --build-arg TORCH_CUDA=cu130 -f images/train.Dockerfile ...
# The training pods run `torchrun ... -m dinocell.cli pretrain` (dinocell.launch).
ARG CUDA_BASE=12.8.1-runtime-ubuntu24.04
FROM nvidia/cuda:${CUDA_BASE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's Python 3.12 (in a venv: the system interpreter is externally managed, PEP 668) and the compilers
# torch.compile needs. Versions come with the pinned base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# torch's dependencies (triton, nvidia-*) come from the same index; pypi as the fallback, as in the Makefile.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
       --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"

WORKDIR /opt/dinocell
COPY pyproject.toml README.md ./
COPY dinocell ./dinocell
# torch is pinned above; the constraint keeps the dependency resolver from swapping it for another build.
RUN echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir -c /tmp/torch-constraint.txt ".[s3,wandb,pipeline]" \
    && python -c "import dinocell, torch; print('dinocell', dinocell.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"

# Non-root; /s3 /minio /gcs for the KFP launcher when the train step runs on this image.
RUN useradd --create-home --uid 10001 --gid 0 dinocell \
    && mkdir -p /s3 /minio /gcs \
    && chown 10001:0 /s3 /minio /gcs \
    && chmod 0775 /s3 /minio /gcs
USER 10001
WORKDIR /home/dinocell

# The toolchain works for the user the pods run as: the pinned torch, gcc and g++ present, and torch.compile
# builds and runs a kernel (CPU inductor; the Triton GPU path needs a GPU, which a build has not).
RUN python -c "import shutil, torch; v = torch.__version__.split('+')[0]; assert v == '${TORCH_VERSION}', v; missing = [c for c in ('gcc', 'g++') if not shutil.which(c)]; assert not missing, missing; f = torch.compile(lambda x: (x.sin() * 2).sum()); print('torch.compile ok:', float(f(torch.ones(16))))" \
    && rm -rf /tmp/torchinductor_*
