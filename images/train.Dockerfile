# The image of the training pods (PyTorchJob / TrainJob; components/image.py TRAIN_IMAGE): CUDA torch + dinocell.
# It also holds kfp, so the train step itself can run on it (backend=local on a GPU node, `compile --local-gpus N`).
#
#   docker build -f images/train.Dockerfile -t ghcr.io/dinocell/dinocell-train:0.1.0-cuda12.8 .   (repository root)
#
# The official PyTorch runtime image pins torch, CUDA 12.8 and cuDNN 9 together (the host driver must support
# CUDA 12.8: R570 or newer). The training pods run `torchrun ... -m dinocell.cli pretrain` (dinocell.launch).
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/dinocell
COPY pyproject.toml README.md ./
COPY dinocell ./dinocell
# Keep the base image's CUDA torch: the constraint pins exactly the installed build (e.g. 2.9.0+cu128).
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir -c /tmp/torch-constraint.txt ".[s3,wandb,pipeline]" \
    && python -c "import dinocell, torch; print('dinocell', dinocell.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"

# Non-root; /s3 /minio /gcs for the KFP launcher when the train step runs on this image.
RUN useradd --create-home --uid 10001 --gid 0 dinocell \
    && mkdir -p /s3 /minio /gcs \
    && chown 10001:0 /s3 /minio /gcs \
    && chmod 0775 /s3 /minio /gcs
USER 10001
WORKDIR /home/dinocell
