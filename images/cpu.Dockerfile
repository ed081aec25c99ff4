# The image of every KFP step: discover, shard, evaluate, publish and the train launcher (components/image.py IMAGE).
# CPU torch + dinocell[s3,pipeline] (kfp, kfp-kubernetes, kubernetes: the launcher creates PyTorchJobs/TrainJobs).
#
#   docker build -f images/cpu.Dockerfile -t ghcr.io/dinocell/dinocell:0.1.0 .      (from the repository root)
#
# Then compile the pipeline against it: DINOCELL_IMAGE=<that tag> python pipeline.py compile
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib

# The CPU wheel from the PyTorch index: a plain `pip install torch` pulls the multi-GB CUDA build.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

WORKDIR /opt/dinocell
COPY pyproject.toml README.md ./
COPY dinocell ./dinocell
# torch is pinned above; the constraint keeps the dependency resolver from swapping it for another build.
RUN echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir -c /tmp/torch-constraint.txt ".[s3,pipeline,cellprofiler]" \
    && python -c "import dinocell, kfp, torch; print('dinocell', dinocell.__version__, 'kfp', kfp.__version__, 'torch', torch.__version__)"

# Run as a non-root user. The KFP launcher copies artifacts to /s3, /minio and /gcs inside the container: create them
# writable for that user (group 0 as well, for platforms that run images under an arbitrary uid in group 0).
RUN useradd --create-home --uid 10001 --gid 0 dinocell \
    && mkdir -p /s3 /minio /gcs \
    && chown 10001:0 /s3 /minio /gcs \
    && chmod 0775 /s3 /minio /gcs
USER 10001
WORKDIR /home/dinocell
