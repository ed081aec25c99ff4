"""Diagnostic images during training, on a fixed batch of fields: `Visualizer`.

Last-block CLS attention maps, PCA-RGB of the patch features, a PCA scatter of every channel view's CLS embedding
(coloured by channel, and by field) and the same-field channel-consistency matrix (on the fixed cosine scale
[-1, 1], so the images of every step and run compare; with its summary numbers) of the teacher backbone, every
`train.vis_every` iterations on rank 0. The fields are the
manifest's val split when there is one (else the first training batch), fixed for the whole run, so the images of
successive iterations are comparable. The trainer runs it under a forked RNG and never lets it stop a run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinocell.channels import is_fluorescent
from dinocell.log import get_logger

__all__ = ["Visualizer"]

log = get_logger(__name__)


class Visualizer:
    """Images on a fixed validation batch: last-block CLS attention, PCA-RGB patch features, channel consistency."""

    def __init__(self, cfg, fields_u8: torch.Tensor, channels: tuple[str, ...], device: torch.device,
                 field_ids: list[str] | None = None):
        self.cfg = cfg
        self.fields_u8 = fields_u8.cpu()
        self.channels = tuple(channels)
        self.device = device
        n = len(self.fields_u8)
        self.field_ids = [str(f) for f in field_ids] if field_ids is not None else [f"field {i}" for i in range(n)]
        if len(self.field_ids) != n:
            raise ValueError(f"Visualizer: {len(self.field_ids)} field ids for {n} fields")

    @classmethod
    def from_config(cls, cfg, first_batch: dict, device: torch.device) -> Visualizer:
        """Fields of the manifest's val split when there is a manifest with one, else the first training batch."""
        n = cfg.train.vis_fields
        if cfg.data.manifest:
            try:
                from dinocell.data.fields import FieldLoader
                from dinocell.jump.manifest import Manifest

                val = Manifest.read(cfg.data.manifest).split("val")
                if len(val):
                    channels = list(first_batch["channels"])
                    loader = FieldLoader(cfg.preprocess, channels, cfg.loader.fetch_workers)
                    fields, errors = loader.load_many(list(val.take(list(range(min(n, len(val))))).records()))
                    if errors:
                        log.warning("visualisation: %d val field(s) failed to load: %s", len(errors), errors[:3])
                    if len(fields) >= 2 and fields[0].image.shape == tuple(first_batch["images"].shape[1:]):
                        images = torch.stack([torch.from_numpy(f.image.copy()) for f in fields])
                        log.info("visualisation batch: %d val fields of %s", len(fields), cfg.data.manifest)
                        return cls(cfg, images, tuple(channels), device, [f.field_id for f in fields])
            except Exception as e:  # noqa: BLE001 - the images are diagnostics: never let them stop training
                log.warning("visualisation: cannot use the manifest's val split (%s: %s); using the first batch",
                            type(e).__name__, e)
        log.info("visualisation batch: the first %d fields of the first training batch", min(n, len(first_batch["images"])))
        ids = first_batch.get("field_ids")
        return cls(cfg, first_batch["images"][:n].clone(), tuple(first_batch["channels"]), device,
                   list(ids[:n]) if ids is not None else None)

    def mean_view(self) -> torch.Tensor:
        """The fluorescent mean of each field at the global crop size, normalised like the training crops."""
        aug = self.cfg.augment
        idx = [i for i, c in enumerate(self.channels) if is_fluorescent(c)]
        x = self.fields_u8[:, idx].float().mean(dim=1, keepdim=True)
        x = F.interpolate(x, size=(aug.global_size, aug.global_size), mode="bilinear", antialias=True,
                          align_corners=False)
        return ((x / 255.0 - aug.norm_mean) / aug.norm_std).to(self.device)

    @torch.no_grad()
    def images(self, backbone) -> tuple[dict, dict]:
        """({name: rgb uint8}, {scalar name: value}) for the teacher backbone (eval mode)."""
        from dinocell.monitor.consistency import embed_views, same_field_matrix, summary
        from dinocell.monitor.figures import (
            COSINE_RANGE,
            attention_maps_image,
            matrix_image,
            pca_rgb_image,
            pca_scatter_image,
        )

        x = self.mean_view()
        patch = backbone.patch_size
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        display = x.cpu()
        out = {
            "vis/attention": attention_maps_image(backbone.get_last_self_attention(x).float().cpu(), grid, display),
            "vis/pca": pca_rgb_image(backbone.forward_features(x)["x_norm_patchtokens"].float().cpu(), grid, display),
        }
        scalars = {}
        aug = self.cfg.augment
        embs = embed_views(backbone, self.fields_u8, list(self.channels), size=aug.global_size, mean=aug.norm_mean,
                           std=aug.norm_std, device=self.device, batch_size=len(self.fields_u8))
        short = ["/".join(f.split("/")[-3:]) for f in self.field_ids]  # plate/well/site: the batch makes legends wide
        out["vis/pca_scatter"] = pca_scatter_image(embs, "cls", {"field": short},
                                                   "teacher CLS embeddings of every channel view, PCA")
        matrix, labels = same_field_matrix(embs, key="cls")
        vmin, vmax = COSINE_RANGE
        out["vis/channel_consistency"] = matrix_image(matrix, labels, "same-field CLS cosine similarity",
                                                      vmin=vmin, vmax=vmax, cmap="coolwarm")
        numbers = summary(embs, key="cls")
        for key in ("same_field", "different_field", "gap", "top1", "mrr"):
            scalars[f"consistency/{key}"] = numbers[key]
        return out, scalars
