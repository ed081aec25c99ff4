"""Config sections of SSL training: `model`, `augment`, `loss`, `optim`, `train`.

Registered with the one config system by dinocell.config, beside the data sections. Defaults are the seed's values (configs/vits8_jump.yaml); each `validate()` rejects values
that cannot work, naming the field. Checks that involve two sections (e.g. the teacher-temperature warm-up against
the number of epochs) or need the final config after every `--set` (model.init against model.pretrained) live in
`validate_training_config(cfg)`, which `pretrain` and the train step's launcher call before any job starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from dinocell.config.errors import ConfigError

_ARCHS = ("vit_tiny", "vit_small", "vit_base")


def _require(ok: bool, field: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class ModelConfig:
    """The student/teacher backbone and the DINO/iBOT heads."""

    # Backbone size: vit_small (ViT-S, the seed's model), vit_tiny (CPU tests), vit_base.
    arch: str = "vit_small"
    # Patch size of the trained model; a patch-16 checkpoint is resized to it (FlexiViT pinv resize).
    patch_size: int = 8
    # Input channels: 1 (every view is one grey plane); a 3-channel checkpoint kernel is summed over its inputs.
    in_chans: int = 1
    # Starting weights: a path or s3:// URI of a DINOv3 checkpoint (released backbone state dict, or a training
    # checkpoint with teacher/backbone.* entries); "" = none.
    pretrained: str = ""
    # How the backbone starts, checked before any job is launched (validate_training_config): "pretrained" =
    # model.pretrained must be set (continued pretraining must never start from random weights by accident; the
    # full config says so); "random" = random init on purpose (model.pretrained must be empty); "auto" = pretrained
    # when model.pretrained is set, else random with a warning (tests, tiny, small experiments).
    init: Literal["auto", "pretrained", "random"] = "auto"
    # Overrides of the arch's width / depth / heads (0 = the arch's value); only for small test models.
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    # Stochastic depth rate of the student (every block the same rate, as DINOv3); the teacher has none.
    drop_path_rate: float = 0.1
    # LayerScale initial value (only matters for random init: a checkpoint brings its own gammas).
    layerscale: float = 1e-5
    # RoPE coordinate rescaling of the student in training: scale log-uniform in [1/r, r] per block (0 or 1 = off).
    rope_rescale: float = 2.0
    # Number of prototypes (output width) of the DINO and iBOT heads.
    n_prototypes: int = 65536
    # Head MLP: in_dim -> hidden -> ... -> bottleneck (head_nlayers linear layers), then L2 norm and prototypes.
    # head_nlayers 0: no MLP, the prototypes score the unit-norm token itself (hidden and bottleneck unused).
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    # BatchNorm on the head's input (the CLS / patch tokens) before the MLP or, with head_nlayers 0, before the
    # prototypes: they score per-dimension standardised tokens. The EMA teacher normalises with the student's
    # running statistics; multi-GPU runs use SyncBatchNorm.
    head_bn: bool = False
    # A final LayerNorm of its own for the CLS and register tokens (DINOv3's option and `cls_norm` keys). Needed to
    # continue from a model whose head BatchNorm was folded into its CLS (dinocell.model.cls_fold, e.g. the shipped
    # tiny start); a tied checkpoint loaded into an untied model starts cls_norm as a copy of norm.
    untie_cls_and_patch_norms: bool = False
    # Separate iBOT head (DINOv3); False shares the DINO head for the masked patch tokens.
    ibot_separate_head: bool = True
    # Recompute each block's activations in backward (less memory, ~15% more compute).
    activation_checkpointing: bool = False
    # torch.compile the student and teacher backbones (GPU; the first iterations are slow while it compiles).
    compile: bool = False

    def validate(self) -> None:
        _require(self.arch in _ARCHS, "model.arch", f"one of {list(_ARCHS)}", self.arch)
        _require(isinstance(self.patch_size, int) and self.patch_size >= 1, "model.patch_size", "an integer >= 1",
                 self.patch_size)
        _require(self.in_chans in (1, 3), "model.in_chans", "1 or 3", self.in_chans)
        for name in ("embed_dim", "depth", "num_heads"):
            _require(getattr(self, name) >= 0, f"model.{name}", ">= 0 (0 = the arch's value)", getattr(self, name))
        if self.embed_dim and self.num_heads:
            _require(self.embed_dim % self.num_heads == 0 and (self.embed_dim // self.num_heads) % 4 == 0,
                     "model.embed_dim", "a multiple of 4 * num_heads (RoPE needs head_dim % 4 == 0)", self.embed_dim)
        _require(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", "in [0, 1)", self.drop_path_rate)
        _require(_finite(self.layerscale) and self.layerscale > 0, "model.layerscale", "> 0", self.layerscale)
        _require(self.rope_rescale == 0 or self.rope_rescale >= 1.0, "model.rope_rescale",
                 "0 (off) or >= 1 (range [1/r, r])", self.rope_rescale)
        for name in ("n_prototypes", "head_hidden_dim", "head_bottleneck_dim"):
            _require(getattr(self, name) >= 1, f"model.{name}", ">= 1", getattr(self, name))
        _require(self.head_nlayers >= 0, "model.head_nlayers", ">= 0 (0 = no MLP)", self.head_nlayers)

    @property
    def starts_pretrained(self) -> bool:
        """Whether the backbone starts from model.pretrained (after validate_training_config: consistent with init)."""
        return self.init == "pretrained" or (self.init == "auto" and bool(self.pretrained))

    def backbone_kwargs(self, student: bool) -> dict:
        """Keyword arguments of `build_vit` for the student (drop path, RoPE rescale) or the teacher (neither)."""
        kwargs = {
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "layerscale_init": self.layerscale,
            "drop_path_rate": self.drop_path_rate if student else 0.0,
            "rope_rescale": (self.rope_rescale if self.rope_rescale > 1.0 else None) if student else None,
            "activation_checkpointing": self.activation_checkpointing if student else False,
            "untie_cls_and_patch_norms": self.untie_cls_and_patch_norms,
        }
        for name in ("embed_dim", "depth", "num_heads"):
            if getattr(self, name):
                kwargs[name] = getattr(self, name)
        return kwargs


@dataclass
class LossConfig:
    """The SSL objective: DINO (CLS) + iBOT (masked patches) + KoLeo, Sinkhorn-Knopp teacher targets."""

    # Weights of the three terms (KoLeo's weight applies to each global crop; the term is summed over them).
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    # Student softmax temperature.
    student_temp: float = 0.1
    # Teacher temperature after warm-up, its start value, and the warm-up length (linear, in epochs).
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    # Sinkhorn-Knopp normalisation rounds on the teacher logits.
    sinkhorn_iterations: int = 3
    # iBOT masks: ratios spread evenly over this range, applied to this fraction of the global-crop images.
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5

    def validate(self) -> None:
        for name in ("dino_weight", "ibot_weight", "koleo_weight"):
            value = getattr(self, name)
            _require(_finite(value) and value >= 0, f"loss.{name}", ">= 0", value)
        _require(self.dino_weight + self.ibot_weight > 0, "loss.dino_weight + loss.ibot_weight", "> 0",
                 self.dino_weight + self.ibot_weight)
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            value = getattr(self, name)
            _require(_finite(value) and value > 0, f"loss.{name}", "> 0", value)
        _require(self.warmup_teacher_temp_epochs >= 0, "loss.warmup_teacher_temp_epochs", ">= 0",
                 self.warmup_teacher_temp_epochs)
        _require(self.sinkhorn_iterations >= 1, "loss.sinkhorn_iterations", ">= 1", self.sinkhorn_iterations)
        low, high = self.mask_ratio_min_max
        _require(0.0 <= low <= high <= 1.0, "loss.mask_ratio_min_max", "[low, high] with 0 <= low <= high <= 1",
                 self.mask_ratio_min_max)
        _require(0.0 <= self.mask_probability <= 1.0, "loss.mask_probability", "in [0, 1]", self.mask_probability)


@dataclass
class OptimConfig:
    """AdamW and the per-iteration schedules (lr, weight decay, teacher momentum). Epoch = iters_per_epoch steps."""

    # Peak learning rate (after warm-up; absolute, not scaled with the batch size) and the cosine end value.
    lr: float = 5e-5
    min_lr: float = 1e-6
    # Weight decay, cosine from weight_decay to weight_decay_end (DINOv3: 0.04 -> 0.4; the seed keeps 0.04).
    weight_decay: float = 0.04
    weight_decay_end: float = 0.04
    # AdamW betas and epsilon.
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Training length in epochs, and iterations per epoch (DINOv3's OFFICIAL_EPOCH_LENGTH convention;
    # 0 = one pass of this rank's share of the training data per epoch).
    epochs: int = 100
    iters_per_epoch: int = 2400
    # Linear lr warm-up from 0, in epochs.
    warmup_epochs: float = 10.0
    # EMA teacher momentum, cosine from momentum_teacher to momentum_teacher_end (DINOv3: 0.992 -> 1.0).
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 0.996
    # Gradient clipping: max L2 norm per student part (backbone, each head), as DINOv2/v3; 0 = off.
    clip_grad: float = 3.0
    # Layer-wise lr decay: block i gets layer_decay^(depth - i) x lr (1.0 = off; DINOv3 option 0.9).
    layer_decay: float = 1.0
    # Extra lr multiplier of the patch embedding (DINOv3 option 0.2; useful for the resized 8x8 kernel too).
    patch_embed_lr_mult: float = 1.0
    # Epochs during which the heads' prototype layers (last_layer) get lr 0 (DINOv3 option 1).
    freeze_last_layer_epochs: float = 0.0
    # Head warm-up: for the first head_warmup_iters iterations the backbone's lr is multiplied by
    # head_warmup_backbone_lr_mult (0 = frozen: no backbone gradient, no AdamW state, and the teacher backbone
    # stays put too) while the randomly initialised DINO/iBOT heads learn to read the pretrained features. Only
    # applies when the backbone starts from model.pretrained (see ModelConfig.init): a random backbone has nothing
    # to protect, so it is ignored (with a log line) for random init. Composes multiplicatively with the lr
    # schedule, layer decay and patch_embed_lr_mult; the iteration alone decides, so a resume is exact.
    head_warmup_iters: int = 0
    head_warmup_backbone_lr_mult: float = 0.0

    def validate(self) -> None:
        _require(_finite(self.lr) and self.lr > 0, "optim.lr", "> 0", self.lr)
        _require(_finite(self.min_lr) and 0 <= self.min_lr <= self.lr, "optim.min_lr", "in [0, optim.lr]",
                 self.min_lr)
        for name in ("weight_decay", "weight_decay_end"):
            _require(_finite(getattr(self, name)) and getattr(self, name) >= 0, f"optim.{name}", ">= 0",
                     getattr(self, name))
        b1, b2 = self.betas
        _require(0 <= b1 < 1 and 0 <= b2 < 1, "optim.betas", "two values in [0, 1)", self.betas)
        _require(self.eps > 0, "optim.eps", "> 0", self.eps)
        _require(self.epochs >= 1, "optim.epochs", ">= 1", self.epochs)
        _require(self.iters_per_epoch >= 0, "optim.iters_per_epoch", ">= 0 (0 = one pass over the data)",
                 self.iters_per_epoch)
        _require(0 <= self.warmup_epochs <= self.epochs, "optim.warmup_epochs", f"in [0, optim.epochs={self.epochs}]",
                 self.warmup_epochs)
        for name in ("momentum_teacher", "momentum_teacher_end"):
            _require(0 <= getattr(self, name) <= 1, f"optim.{name}", "in [0, 1]", getattr(self, name))
        _require(self.clip_grad >= 0, "optim.clip_grad", ">= 0 (0 = off)", self.clip_grad)
        _require(0 < self.layer_decay <= 1, "optim.layer_decay", "in (0, 1]", self.layer_decay)
        _require(self.patch_embed_lr_mult >= 0, "optim.patch_embed_lr_mult", ">= 0", self.patch_embed_lr_mult)
        _require(0 <= self.freeze_last_layer_epochs <= self.epochs, "optim.freeze_last_layer_epochs",
                 f"in [0, optim.epochs={self.epochs}]", self.freeze_last_layer_epochs)
        _require(isinstance(self.head_warmup_iters, int) and self.head_warmup_iters >= 0, "optim.head_warmup_iters",
                 "an integer >= 0 (0 = off)", self.head_warmup_iters)
        if self.iters_per_epoch:
            total = self.epochs * self.iters_per_epoch
            _require(self.head_warmup_iters <= total, "optim.head_warmup_iters",
                     f"<= the run's {total} iterations (optim.epochs x optim.iters_per_epoch)", self.head_warmup_iters)
        _require(_finite(self.head_warmup_backbone_lr_mult) and 0 <= self.head_warmup_backbone_lr_mult <= 1,
                 "optim.head_warmup_backbone_lr_mult", "in [0, 1] (0 = backbone frozen)",
                 self.head_warmup_backbone_lr_mult)


@dataclass
class TrainConfig:
    """The run: where it writes, on what device, how long, and how it logs, checkpoints and reacts to NaN."""

    # Local directory or s3:// prefix; the run writes under <output_dir>/<run_name>/ (checkpoints/, metrics, images).
    output_dir: str = "runs"
    # Run name ("" = "pretrain"); rerunning the same name resumes from its latest checkpoint.
    run_name: str = ""
    # "auto" = cuda:LOCAL_RANK when CUDA is available, else cpu; or "cpu" / "cuda".
    device: str = "auto"
    # "bf16": autocast in bfloat16 with fp32 master weights and fp32 losses; "fp32": no autocast.
    precision: Literal["bf16", "fp32"] = "bf16"
    # Seeds the model init, augmentation, masks and data order (each rank derives its own streams from it).
    seed: int = 0
    # Stop after this many iterations (0 = optim.epochs * iters_per_epoch); the schedules keep the full length.
    max_iters: int = 0
    # Log scalars every log_every iterations; images (attention, PCA, channel consistency) every vis_every (0 = off).
    log_every: int = 20
    vis_every: int = 2000
    # Fields of the fixed validation batch used for the images.
    vis_fields: int = 8
    # Checkpoint every ckpt_every iterations (0 = only at the end); keep the last keep_last, plus one every
    # milestone_every iterations (0 = none) that pruning never removes.
    ckpt_every: int = 1000
    keep_last: int = 3
    milestone_every: int = 0
    # On a non-finite loss or gradient: "stop" (raise, keeping the last good checkpoint) or "skip" the batch
    # (no update; counted) up to max_skips times in the run, then stop.
    nan_policy: Literal["stop", "skip"] = "stop"
    max_skips: int = 10
    # Weights & Biases: "disabled", "offline" (files only) or "online"; the project name.
    wandb_mode: Literal["disabled", "offline", "online"] = "disabled"
    wandb_project: str = "dinocell"
    # tqdm progress bar on rank 0: "auto" = only on an interactive terminal, true = always, false = never.
    progress: Literal["auto", True, False] = "auto"
    # torch.distributed timeout for collectives (minutes).
    dist_timeout_min: int = 30

    def validate(self) -> None:
        _require(bool(self.output_dir), "train.output_dir", "a local path or s3:// prefix", self.output_dir)
        _require("/" not in self.run_name and self.run_name not in (".", ".."), "train.run_name",
                 "a plain name (no '/')", self.run_name)
        _require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "train.device",
                 "auto, cpu, cuda or cuda:N", self.device)
        _require(self.max_iters >= 0, "train.max_iters", ">= 0", self.max_iters)
        _require(self.log_every >= 1, "train.log_every", ">= 1", self.log_every)
        for name in ("vis_every", "ckpt_every", "milestone_every", "max_skips"):
            _require(getattr(self, name) >= 0, f"train.{name}", ">= 0", getattr(self, name))
        _require(self.vis_fields >= 1, "train.vis_fields", ">= 1", self.vis_fields)
        _require(self.keep_last >= 1, "train.keep_last", ">= 1", self.keep_last)
        _require(self.dist_timeout_min >= 1, "train.dist_timeout_min", ">= 1", self.dist_timeout_min)

    @property
    def name(self) -> str:
        return self.run_name or "pretrain"


def total_iterations(optim: OptimConfig, iters_per_epoch: int) -> int:
    """Length of the schedules: epochs x iterations per epoch."""
    return optim.epochs * iters_per_epoch


def effective_head_warmup_iters(cfg) -> int:
    """optim.head_warmup_iters when the backbone starts from pretrained weights, else 0 (nothing to protect)."""
    return cfg.optim.head_warmup_iters if cfg.model.starts_pretrained else 0


def _init_problems(model) -> list[str]:
    """model.init against model.pretrained. Checked here, on the final config (after every --set), not per section:
    the full config says init=pretrained with pretrained "" and expects the weights as an override."""
    if model.init == "pretrained" and not model.pretrained:
        return [
            "model.pretrained is empty but model.init=pretrained: continued pretraining would start from RANDOM "
            "weights. Pass the DINOv3 checkpoint, e.g. --set model.pretrained=s3://BUCKET/"
            "dinov3_vits16_pretrain_lvd1689m-08c60483.pth (or a local path; in the pipeline: "
            "overrides=[\"model.pretrained=...\"]), or set model.init=random to train from random weights on purpose"
        ]
    if model.init == "random" and model.pretrained:
        return [
            f"model.init=random but model.pretrained={model.pretrained!r} is set: clear model.pretrained, or set "
            "model.init=pretrained (or auto) to start from it"
        ]
    return []


def check_model_init(model) -> None:
    """Only the model.init / model.pretrained check (raises ConfigError), for callers that hold a config whose data
    fields are filled in later (e.g. a pipeline submission, where loader.shards comes from the shard step)."""
    problems = _init_problems(model)
    if problems:
        raise ConfigError("config error: " + "; ".join(problems))


def validate_training_config(cfg) -> None:
    """Checks that span sections; raises dinocell.config.ConfigError naming the fields."""

    problems = _init_problems(cfg.model)
    if cfg.loss.warmup_teacher_temp_epochs > cfg.optim.epochs:
        problems.append(
            f"loss.warmup_teacher_temp_epochs={cfg.loss.warmup_teacher_temp_epochs} exceeds optim.epochs={cfg.optim.epochs}"
        )
    if cfg.loader.batch_size < 2:
        problems.append(f"loader.batch_size={cfg.loader.batch_size}: KoLeo needs at least 2 fields per rank and step")
    if cfg.augment.global_size % cfg.model.patch_size or cfg.augment.local_size % cfg.model.patch_size:
        problems.append(
            f"augment.global_size={cfg.augment.global_size} and augment.local_size={cfg.augment.local_size} must be "
            f"multiples of model.patch_size={cfg.model.patch_size}"
        )
    if cfg.loader.mode == "shards" and not cfg.loader.shards:
        problems.append("loader.shards is empty: set the shard index URI (or loader.mode=raw with data.manifest)")
    if cfg.loader.mode == "raw" and not cfg.data.manifest:
        problems.append("loader.mode=raw needs data.manifest (the field manifest URI)")
    if problems:
        raise ConfigError("config error: " + "; ".join(problems))
