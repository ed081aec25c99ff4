"""KFP component: find the fields of the source and write the field manifest (dinocell.jump.step.discover).

No per-run input (run name, job id): the manifest's prefix is named by a hash of the inputs
(dinocell.pipeline.data_keys), so a rerun with the same inputs is a KFP cache hit.
"""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def discover(
    config: str,
    overrides: list,
    images_prefix: str,
    load_data: list,
    mode: str,
    output_root: str,
    s3_endpoint: str,
    s3_anonymous: bool,
    manifest: Output[Dataset],
    summary: Output[Markdown],
):
    from dinocell.jump import step
    from dinocell.pipeline import data_keys
    from dinocell.pipeline.pointers import write_pointer

    key = data_keys.discovery_key(config, overrides, images_prefix=images_prefix, load_data=load_data, mode=mode,
                                  endpoint_url=s3_endpoint, anonymous=s3_anonymous)
    out = step.discover(
        config, overrides, manifest_uri=data_keys.manifest_uri(output_root, key), images_prefix=images_prefix,
        load_data=load_data, mode=mode, endpoint_url=s3_endpoint, anonymous=s3_anonymous,
    )
    manifest.metadata.update(write_pointer(manifest.path, out.manifest_uri, content_key=key, **out.metadata()))
    with open(summary.path, "w") as f:
        f.write(out.markdown())
