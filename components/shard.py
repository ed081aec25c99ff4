"""KFP component: preprocess the manifest's training fields into tar shards (dinocell.data.step.shard)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def shard(
    config: str,
    overrides: list,
    manifest: Input[Dataset],
    output_root: str,
    run_name: str,
    job_id: str,
    s3_endpoint: str,
    s3_anonymous: bool,
    shards: Output[Dataset],
):
    from dinocell.data import step
    from dinocell.pipeline.layout import RunLayout
    from dinocell.pipeline.pointers import read_pointer, write_pointer

    layout = RunLayout.for_run(output_root, run_name, job_id)
    out = step.shard(
        config, overrides, manifest_uri=read_pointer(manifest.metadata, manifest.path, "manifest"),
        shards_prefix=layout.shards, endpoint_url=s3_endpoint, anonymous=s3_anonymous,
    )
    shards.metadata.update(write_pointer(shards.path, out.index_uri, **out.metadata()))
