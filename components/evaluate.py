"""KFP component: channel-consistency evaluation of the checkpoint (dinocell.eval.step.evaluate).

Independent views (`view_mode`, `eval_seed`) and the copairs profiling section (`profiling`, `profile_fields`,
`profile_normalisation`, `cellprofiler`) keep their step defaults unless the pipeline passes them.
Outputs: one KFP metric per scalar (Metrics, including `profiling.<model>.activity_map` etc.), the HTML report with its images embedded (HTML), the summary table
(Markdown), and the URI of metrics.json as the return value (for the publish step).
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    config: str,
    overrides: list,
    manifest: Input[Dataset],
    checkpoint: Input[Model],
    output_root: str,
    run_name: str,
    job_id: str,
    baseline: str,
    s3_endpoint: str,
    s3_anonymous: bool,
    metrics: Output[Metrics],
    report: Output[HTML],
    summary: Output[Markdown],
    view_mode: str = "both",
    eval_seed: int = 0,
    profiling: bool = True,
    profile_fields: int = 2048,
    profile_normalisation: str = "mad",
    cellprofiler: bool = True,
) -> str:
    from dinocell.eval import step
    from dinocell.pipeline.layout import RunLayout
    from dinocell.pipeline.pointers import read_pointer

    layout = RunLayout.for_run(output_root, run_name, job_id)
    out = step.evaluate(
        config, overrides, checkpoint_uri=read_pointer(checkpoint.metadata, checkpoint.path, "checkpoint"),
        manifest_uri=read_pointer(manifest.metadata, manifest.path, "manifest"), out_uri=layout.eval,
        baseline=baseline, endpoint_url=s3_endpoint, anonymous=s3_anonymous, view_mode=view_mode, seed=eval_seed,
        profiling=profiling, profile_fields=profile_fields, profile_normalisation=profile_normalisation,
        cellprofiler=cellprofiler,
    )
    for name, value in out.scalars.items():
        metrics.log_metric(name, value)
    with open(report.path, "w") as f:
        f.write(out.report_html(inline=True))
    with open(summary.path, "w") as f:
        f.write(out.summary_md)
    return out.metrics_uri
