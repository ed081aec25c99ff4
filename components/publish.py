"""KFP component: publish the checkpoint's teacher backbone as a versioned model (dinocell.publish.step.publish)."""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def publish(
    config: str,
    overrides: list,
    checkpoint: Input[Model],
    metrics_uri: str,
    output_root: str,
    run_name: str,
    job_id: str,
    models_prefix: str,
    model_name: str,
    model_version: str,
    s3_endpoint: str,
    s3_anonymous: bool,
    model: Output[Model],
):
    from dinocell.pipeline.layout import RunLayout
    from dinocell.pipeline.pointers import read_pointer, write_pointer
    from dinocell.publish import step

    layout = RunLayout.for_run(output_root, run_name, job_id, models_prefix)
    out = step.publish(
        read_pointer(checkpoint.metadata, checkpoint.path, "checkpoint"), dest_prefix=layout.models,
        name=model_name, version=layout.model_version(model_version), metrics_uri=metrics_uri, config=config,
        overrides=overrides, endpoint_url=s3_endpoint, anonymous=s3_anonymous,
    )
    model.metadata.update(write_pointer(model.path, out.uri, **out.metadata()))
