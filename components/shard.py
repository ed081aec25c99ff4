"""KFP component: preprocess the manifest's training fields into tar shards (dinocell.data.step.shard).

No per-run input: the shards' prefix is named by a hash of the manifest's bytes and the preprocess / shard config
(dinocell.pipeline.data_keys), so a rerun with the same inputs is a KFP cache hit, and a cache miss with the same
content key finds the complete shard set and reuses it (outcome metadata `reused` / `written`).
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def shard(
    config: str,
    overrides: list,
    manifest: Input[Dataset],
    output_root: str,
    s3_endpoint: str,
    s3_anonymous: bool,
    shards: Output[Dataset],
):
    from dinocell.data import step
    from dinocell.pipeline import data_keys
    from dinocell.pipeline.pointers import read_pointer, write_pointer

    manifest_uri = read_pointer(manifest.metadata, manifest.path, "manifest")
    key = data_keys.shard_key(config, overrides, manifest_uri=manifest_uri, endpoint_url=s3_endpoint,
                              anonymous=s3_anonymous)
    out = step.shard(
        config, overrides, manifest_uri=manifest_uri, shards_prefix=data_keys.shards_prefix(output_root, key),
        endpoint_url=s3_endpoint, anonymous=s3_anonymous,
    )
    shards.metadata.update(write_pointer(shards.path, out.index_uri, content_key=key, **out.metadata()))
