"""Student/teacher SSL model (DINOv3 recipe) and its forward-backward for one batch.

student = backbone (drop path, RoPE rescale in training) + DINO head + iBOT head; teacher = EMA copies with no
gradient, an eval-mode backbone (no drop path, no RoPE rescale): dinocell.train.ema. One step on a batch of
multi-view crops:

1. teacher (no grad) on the global crops: CLS -> DINO head -> Sinkhorn-Knopp(teacher_temp) = DINO targets
   [n_global, B, K]; patch tokens at the masked positions -> iBOT head -> Sinkhorn-Knopp = iBOT targets [M, K];
2. student on global crops (masked patches replaced by the mask token) and local crops, in one
   `forward_features_list` call (token-wise layers run once over both sizes);
3. DINO head on the CLS tokens of all student crops; DINO loss = 2/18 global term + 16/18 local term (each global
   teacher crop teaches the other global crop and every local crop);
   iBOT head on the student's masked patch tokens; KoLeo on the student's normed CLS of each global crop;
   total = dino_weight * dino + ibot_weight * ibot + koleo_weight * koleo, then backward.

Head warm-up (`train_backbone=False`): the student backbone runs without autograd (no backbone gradient, so AdamW
skips its parameters and they stay bit-exact; the backbone backward is not computed at all) and `update_teacher`
leaves the teacher backbone alone; the heads train as usual.

Precision: bf16 autocast around the networks (fp32 master weights, fp32 residual stream), every loss in fp32.
Gradient clipping is per student part (backbone, each head), as DINOv2/DINOv3 clip each FSDP module.
Distributed: `wrap_ddp` puts each student part in its own DistributedDataParallel (each is called exactly once per
step; a shared DINO/iBOT head is called once on the concatenated tokens for that reason). Teacher targets use
Sinkhorn-Knopp over the rows of every rank (dinocell.loss.sinkhorn_knopp all-reduces the prototype marginals).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dinocell.log import get_logger
from dinocell.loss import DINOLoss, KoLeoLoss, MaskBatch, combine_dino_terms, iBOTPatchLoss, sinkhorn_knopp
from dinocell.model import DINOHead, build_vit, load_dinov3_checkpoint
from dinocell.train import ema

log = get_logger(__name__)

LOSS_KEYS = ("total", "dino", "dino_global", "dino_local", "ibot", "koleo")


@dataclass
class SSLInputs:
    """One rank's batch of crops, crop-major (row s * B + b = crop slot s of field b), on the training device."""

    global_crops: Tensor  # float [n_global * B, C, G, G]
    local_crops: Tensor | None  # float [n_local * B, C, L, L], or None / empty with no local crops
    masks: MaskBatch  # iBOT masks of the global crops (tensors on the same device)
    n_global_crops: int = 2

    @property
    def batch_size(self) -> int:
        return self.global_crops.shape[0] // self.n_global_crops

    @property
    def n_local_crops(self) -> int:
        if self.local_crops is None or self.local_crops.shape[0] == 0:
            return 0
        return self.local_crops.shape[0] // self.batch_size


def mask_batch_to(masks: MaskBatch, device: torch.device) -> MaskBatch:
    """The same masks with every tensor on `device` (non-blocking from pinned memory)."""
    return MaskBatch(
        masks.masks.to(device, non_blocking=True),
        masks.mask_indices.to(device, non_blocking=True),
        masks.masks_weight.to(device, non_blocking=True),
        masks.n_masked_patches,
    )


class MultiCropBackbone(nn.Module):
    """A backbone called on several crop batches at once (`forward_features_list`): forward(xs, masks_list) =
    [(normed CLS [B, D], normed patch tokens [B, HW, D]) per crop batch].

    A module whose `forward` is the multi-crop call, so DistributedDataParallel and torch.compile (which hook
    `forward`) see the real step; parameters are the backbone's own (keys `backbone.*` inside this wrapper only).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, xs: list[Tensor], masks_list: list[Tensor | None]) -> list[tuple[Tensor, Tensor]]:
        outs = self.backbone.forward_features_list(xs, masks_list)
        return [(o["x_norm_clstoken"], o["x_norm_patchtokens"]) for o in outs]


def build_head(model_cfg, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim,
        hidden_dim=model_cfg.head_hidden_dim,
        bottleneck_dim=model_cfg.head_bottleneck_dim,
        n_prototypes=model_cfg.n_prototypes,
        nlayers=model_cfg.head_nlayers,
        input_bn=model_cfg.head_bn,
    )


class SSLMetaArch(nn.Module):
    """Student + EMA teacher + the DINO/iBOT/KoLeo objective. See the module docstring."""

    def __init__(self, model_cfg, loss_cfg, precision: str = "bf16"):
        super().__init__()
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"SSLMetaArch: precision must be 'bf16' or 'fp32', got {precision!r}")
        self.model_cfg = model_cfg
        self.loss_cfg = loss_cfg
        self.precision = precision

        student_backbone = build_vit(model_cfg.arch, **model_cfg.backbone_kwargs(student=True))
        teacher_backbone = build_vit(model_cfg.arch, **model_cfg.backbone_kwargs(student=False))
        dim = student_backbone.embed_dim
        student = {"backbone": student_backbone, "dino_head": build_head(model_cfg, dim)}
        if model_cfg.ibot_separate_head:
            student["ibot_head"] = build_head(model_cfg, dim)
        self.student = nn.ModuleDict(student)
        self.teacher = ema.build_teacher(self.student, teacher_backbone)

        k = model_cfg.n_prototypes
        self.dino_loss = DINOLoss(k, student_temp=loss_cfg.student_temp)
        self.ibot_loss = iBOTPatchLoss(k, student_temp=loss_cfg.student_temp)
        self.koleo_loss = KoLeoLoss()

        # What the step calls; replaced by DDP / compiled wrappers (plain dict: not registered as submodules).
        self.calls: dict[str, nn.Module] = self._plain_calls()
        self._check_teacher_matches()

    # ------------------------------------------------------------------------------------------ setup
    def _check_teacher_matches(self) -> None:
        s = [n for n, _ in self.student.named_parameters()]
        t = [n for n, _ in self.teacher.named_parameters()]
        if s != t:
            raise RuntimeError(f"student and teacher parameters differ: {sorted(set(s) ^ set(t))[:5]}")

    @property
    def depth(self) -> int:
        return self.student.backbone.n_blocks

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher is always deterministic: no drop path, no RoPE rescale
        return self

    def reset_teacher(self) -> None:
        """teacher <- student (after loading pretrained weights or after DDP broadcast rank 0's student)."""
        ema.reset_teacher(self.teacher, self.student)

    def load_pretrained(self, path_or_uri: str, input_norm=None):
        """DINOv3 backbone weights into the student backbone (patch / channel adapted; the RGB kernel folded for grey
        crops normalised with `input_norm`, dinocell.model.patch_adapt.InputNorm, default dinocell's), then
        teacher <- student."""
        report = load_dinov3_checkpoint(self.student.backbone, path_or_uri, strict=True, input_norm=input_norm)
        self.reset_teacher()
        return report

    def _plain_calls(self) -> dict[str, nn.Module]:
        calls: dict[str, nn.Module] = {
            "student_backbone": MultiCropBackbone(self.student.backbone),
            "teacher_backbone": MultiCropBackbone(self.teacher.backbone),
            "dino_head": self.student.dino_head,
        }
        if "ibot_head" in self.student:
            calls["ibot_head"] = self.student.ibot_head
        return calls

    def release_wrappers(self) -> None:
        """Drop the DDP / compiled wrappers: a DDP reducer holds the process group, which must die before exit."""
        self.calls = self._plain_calls()

    def wrap_ddp(self, device: torch.device) -> None:
        """Each student part in its own DistributedDataParallel (broadcasts rank 0's weights), then teacher <- student."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        # the buffers (RoPE periods, k-bias masks) are constants: no per-forward broadcast (newer torch names it
        # forward_sync_buffers, older ones broadcast_buffers)
        params = inspect.signature(DDP.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        for name in ("student_backbone", "dino_head", "ibot_head"):
            if name not in self.calls:
                continue
            sync = no_sync
            if name != "student_backbone" and self.model_cfg.head_bn:
                if device.type == "cuda":  # batch statistics over all ranks (the same Parameters, so the optimizer holds)
                    nn.SyncBatchNorm.convert_sync_batchnorm(self.calls[name])
                else:  # SyncBatchNorm is CUDA-only: keep the ranks' running statistics rank 0's
                    sync = {k: True for k in no_sync}
            self.calls[name] = DDP(self.calls[name], device_ids=ids, **sync)
        self.reset_teacher()

    def compile_backbones(self) -> None:
        """torch.compile the student and teacher multi-crop calls (static shapes: crop sizes and mask counts are fixed)."""
        for name in ("student_backbone", "teacher_backbone"):
            self.calls[name] = torch.compile(self.calls[name], dynamic=False)

    def student_named_parameters(self):
        return self.student.named_parameters()

    # ------------------------------------------------------------------------------------------ the step
    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _heads(self, which: str, cls_tokens: Tensor, patch_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(DINO logits of cls_tokens, iBOT logits of patch_tokens) with the student's or teacher's heads; a shared
        head runs once on both (one call per step keeps DDP's one-forward-per-backward contract)."""
        if which == "student":
            dino, ibot = self.calls["dino_head"], self.calls.get("ibot_head")
        else:
            dino, ibot = self.teacher.dino_head, getattr(self.teacher, "ibot_head", None)
        if ibot is not None:
            return dino(cls_tokens), ibot(patch_tokens)
        both = dino(torch.cat([cls_tokens, patch_tokens]))
        return both[: cls_tokens.shape[0]], both[cls_tokens.shape[0] :]

    @torch.no_grad()
    def teacher_targets(self, inputs: SSLInputs, teacher_temp: float) -> tuple[Tensor, Tensor]:
        """(DINO targets [n_global, B, K], iBOT targets [M, K]) as fp32 Sinkhorn-Knopp probabilities."""
        device = inputs.global_crops.device
        n_iter = self.loss_cfg.sinkhorn_iterations
        with self._autocast(device):
            [(cls, patches)] = self.calls["teacher_backbone"]([inputs.global_crops], [None])
            masked = patches.flatten(0, 1).index_select(0, inputs.masks.mask_indices)
            dino_logits, ibot_logits = self._heads("teacher", cls, masked)
        dino_targets = sinkhorn_knopp(dino_logits, teacher_temp, n_iter)
        ibot_targets = sinkhorn_knopp(ibot_logits, teacher_temp, n_iter)
        return dino_targets.unflatten(0, (inputs.n_global_crops, inputs.batch_size)), ibot_targets

    def compute_losses(self, inputs: SSLInputs, teacher_temp: float, train_backbone: bool = True) -> dict[str, Tensor]:
        """The loss terms (fp32 scalars, `total` with graph) for one batch; see the module docstring.
        train_backbone=False (head warm-up): the student backbone runs without autograd, only the heads get grads."""
        n_global, batch, n_local = inputs.n_global_crops, inputs.batch_size, inputs.n_local_crops
        if inputs.masks.n_images != inputs.global_crops.shape[0]:
            raise ValueError(
                f"SSLMetaArch: {inputs.masks.n_images} masks for {inputs.global_crops.shape[0]} global-crop images"
            )
        if batch < 2:
            raise ValueError(f"SSLMetaArch: KoLeo needs at least 2 fields per batch, got {batch}")
        dino_targets, ibot_targets = self.teacher_targets(inputs, teacher_temp)

        device = inputs.global_crops.device
        with self._autocast(device):
            xs, masks = [inputs.global_crops], [inputs.masks.masks]
            if n_local:
                xs.append(inputs.local_crops)
                masks.append(None)
            with torch.set_grad_enabled(train_backbone and torch.is_grad_enabled()):
                outs = self.calls["student_backbone"](xs, masks)
            global_cls, global_patches = outs[0]
            all_cls = torch.cat([global_cls] + [o[0] for o in outs[1:]])
            masked = global_patches.flatten(0, 1).index_select(0, inputs.masks.mask_indices)
            dino_logits, ibot_logits = self._heads("student", all_cls, masked)

        # losses in fp32 (the chunked cross-entropy upcasts bf16 logits chunk by chunk)
        student_global = dino_logits[: n_global * batch].unflatten(0, (n_global, batch))
        student_local = dino_logits[n_global * batch :].unflatten(0, (n_local, batch)) if n_local else None
        dino_global, dino_local = self.dino_loss(student_global, student_local, dino_targets)
        dino = combine_dino_terms(dino_global, dino_local, n_global, n_local) if n_global > 1 or n_local else dino_global
        ibot = self.ibot_loss(ibot_logits, ibot_targets, inputs.masks.masks_weight, inputs.masks.n_images)
        koleo = self.koleo_loss(global_cls.float().unflatten(0, (n_global, batch)))
        cfg = self.loss_cfg
        total = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo
        return {
            "total": total,
            "dino": dino.detach(),
            "dino_global": dino_global.detach(),
            "dino_local": dino_local.detach(),
            "ibot": ibot.detach(),
            "koleo": koleo.detach(),
        }

    def forward_backward(self, inputs: SSLInputs, teacher_temp: float, train_backbone: bool = True) -> dict[str, Tensor]:
        """Losses of one batch and their backward into the student's .grad; returns detached fp32 scalars.
        train_backbone=False: the backbone gets no gradient (head warm-up with a frozen backbone)."""
        losses = self.compute_losses(inputs, teacher_temp, train_backbone)
        losses["total"].backward()
        losses["total"] = losses["total"].detach()
        return losses

    def forward(self, inputs: SSLInputs, teacher_temp: float) -> dict[str, Tensor]:
        return self.forward_backward(inputs, teacher_temp)

    # ------------------------------------------------------------------------------------------ after backward
    def clip_gradients(self, max_norm: float) -> Tensor:
        """Clip each student part's gradient to max_norm (0 = only measure); returns the norms [n_parts] (fp32)."""
        norms = []
        for part in self.student.values():
            params = [p for p in part.parameters() if p.grad is not None]
            if not params:
                norms.append(torch.zeros((), device=next(part.parameters()).device))
                continue
            if max_norm > 0:
                norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm).float())
            else:
                norms.append(torch.nn.utils.get_total_norm([p.grad for p in params]).float())
        return torch.stack(norms)

    def update_teacher(self, momentum: float, backbone: bool = True) -> None:
        """The EMA step: teacher = momentum * teacher + (1 - momentum) * student (dinocell.train.ema).

        backbone=False (frozen head warm-up): only the heads move. Skipping the backbone keeps it bit-exact: the EMA of
        two equal tensors, m * t + (1 - m) * t, is not always t in floating point."""
        if backbone:
            ema.update_teacher(self.teacher, self.student, momentum)
            return
        for name, part in self.student.items():
            if name != "backbone":
                ema.update_teacher(self.teacher[name], part, momentum)
