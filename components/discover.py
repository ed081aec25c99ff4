"""KFP component: find the fields of the source and write the field manifest (dinocell.jump.step.discover)."""

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
    run_name: str,
    job_id: str,
    s3_endpoint: str,
    s3_anonymous: bool,
    manifest: Output[Dataset],
    summary: Output[Markdown],
):
    from dinocell.jump import step
    from dinocell.pipeline.layout import RunLayout
    from dinocell.pipeline.pointers import write_pointer

    layout = RunLayout.for_run(output_root, run_name, job_id)
    out = step.discover(
        config, overrides, manifest_uri=layout.manifest, images_prefix=images_prefix, load_data=load_data,
        mode=mode, endpoint_url=s3_endpoint, anonymous=s3_anonymous,
    )
    manifest.metadata.update(write_pointer(manifest.path, out.manifest_uri, **out.metadata()))
    with open(summary.path, "w") as f:
        f.write(out.markdown())
