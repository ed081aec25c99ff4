"""Thin Kubeflow Pipelines components: each imports its step's one entry (`dinocell.<package>.step`) inside its
body, calls it, and fills its outputs.

Only a component's function source is shipped to the pod (install_kfp_package=False, no packages_to_install): the
image (components/image.py, images/cpu.Dockerfile) already holds kfp and dinocell, so the code a step runs is the
package's, the same that the `dinocell` CLI, `python pipeline.py demo --steps` and the tests run.
"""

from components.discover import discover
from components.evaluate import evaluate
from components.image import IMAGE, TRAIN_IMAGE
from components.publish import publish
from components.shard import shard
from components.train import train

__all__ = ["IMAGE", "TRAIN_IMAGE", "discover", "evaluate", "publish", "shard", "train"]
