"""The container images of the pipeline: one for every KFP step, one for the training pods.

IMAGE (images/cpu.Dockerfile): python:3.11-slim + CPU torch + dinocell[s3,pipeline]; runs discover, shard, evaluate,
publish and the train launcher. TRAIN_IMAGE (images/train.Dockerfile): CUDA torch + dinocell; runs the PyTorchJob /
TrainJob pods (and the train step itself for backend=local on a GPU node).

Both are read when the components are defined (at import), so set DINOCELL_IMAGE / DINOCELL_TRAIN_IMAGE before
`python pipeline.py compile` to bake your registry's tags into pipeline.yaml. The training image is also a pipeline
parameter (`train_image`), so a compiled pipeline can switch it per run.
"""

import os

IMAGE = os.environ.get("DINOCELL_IMAGE", "ghcr.io/dinocell/dinocell:0.1.0")
TRAIN_IMAGE = os.environ.get("DINOCELL_TRAIN_IMAGE", "ghcr.io/dinocell/dinocell-train:0.1.0-cuda12.8")
