"""KFP component: the training launcher (dinocell.launch.step.train).

backend "local" trains inside this step's pod (give the task a GPU: `python pipeline.py compile --local-gpus N`);
"pytorchjob" / "trainjob" create a Kubernetes job whose pods get the GPUs (gpus_per_node x nodes, node selector,
tolerations and the storage Secret), follow it to the end and hand on the final checkpoint. The launcher pod itself
needs no GPU, only RBAC to create the job (manifests/base/rbac.yaml). The job is owned by this task's pod (POD_NAME /
POD_UID from the downward API, set in pipeline.py) and deleted on SIGTERM, so cancelling the run stops it; a lease
in the run directory refuses a second live job on the same run name.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    config: str,
    overrides: list,
    manifest: Input[Dataset],
    shards: Input[Dataset],
    output_root: str,
    run_name: str,
    job_id: str,
    backend: str,
    nodes: int,
    gpus_per_node: int,
    nproc_per_node: int,
    train_image: str,
    node_selector: dict,
    tolerations: list,
    secret_name: str,
    namespace: str,
    cpu_per_node: str,
    memory_per_node: str,
    timeout_hours: float,
    s3_endpoint: str,
    s3_anonymous: bool,
    checkpoint: Output[Model],
):
    from dinocell.launch import step
    from dinocell.pipeline.layout import RunLayout
    from dinocell.pipeline.pointers import read_pointer, write_pointer

    layout = RunLayout.for_run(output_root, run_name, job_id)
    out = step.train(
        config, overrides, output_dir=layout.train_output_dir, config_uri=layout.train_config,
        shards_index_uri=read_pointer(shards.metadata, shards.path, "shards"),
        manifest_uri=read_pointer(manifest.metadata, manifest.path, "manifest"),
        backend=backend, nodes=nodes, gpus_per_node=gpus_per_node, nproc_per_node=nproc_per_node, image=train_image,
        node_selector=node_selector, tolerations=tolerations, secret_name=secret_name, namespace=namespace,
        cpu_per_node=cpu_per_node, memory_per_node=memory_per_node, timeout_s=timeout_hours * 3600,
        endpoint_url=s3_endpoint, anonymous=s3_anonymous,
    )
    checkpoint.metadata.update(write_pointer(checkpoint.path, out.checkpoint_uri, **out.metadata()))
