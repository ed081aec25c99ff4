"""Multi-view channel-consistency augmentation, batched on the training device.

From a batch of preprocessed fields (uint8 [B, C, H, W] plus the names of the C channels) build the DINO views.
`augment.crop_policy` says which source each crop shows:

- "multiview" (the method, default): global crop 1 the mean of the fluorescent channels; global crop 2 one
  fluorescent channel chosen uniformly; `n_local` local crops each the fluorescent mean with probability
  `mean_prob_local`, else one random channel. So the teacher's view of the mean teaches the student's view of a
  single channel and back: the model must map every channel of a field to a consistent representation.
- "mean_only" (ablation): every crop, global and local, from the fluorescent mean.
- "single_only" (ablation): every crop from one random channel, each crop its own draw.

The policy only sets each crop slot's probability of the mean; every random number is drawn as for "multiview", so
for one seed the three policies give the same boxes, flips, jitter, blur and channel draws and differ only in source.

Channels (`channel_names` may be any set, e.g. without DNA, with Actin or a phase-contrast plane): a name is
transmitted-light if it is in dinocell.channels.BRIGHTFIELD_CHANNELS, contains "bright" or "phase", ends with "bf"
or is "dic" (case-insensitive); every other name is fluorescent (see is_transmitted_light). The mean is over the
fluorescent channels present (dinocell's 5 in FLUORESCENT_CHANNELS order, then the others in batch order). A batch
without fluorescent channels is an error for a policy that shows the mean, and for "single_only" unless
brightfield_prob is 1.

Brightfield (`brightfield_prob` = p, off by default): when p > 0 and the batch carries transmitted-light channels,
every single-channel choice (global crop 2 and the single-channel local crops) picks one of them (uniformly among
those present) with probability p, else a fluorescent channel (uniformly). The mean never includes them. A batch
without transmitted-light channels uses fluorescent channels only; `MultiViewBatch.brightfield_available` says which
case a batch was in, so a trainer can count batches that could not honour p.

Per crop, in this order (on the 0-255 scale, float): random resized crop (torchvision's RandomResizedCrop
distribution, antialiased resize; see image_ops), horizontal flip, vertical flip, rotation by k quarter turns
(k uniform in 0..3; microscopy has no canonical orientation), brightness/contrast jitter with probability
`jitter_prob`, Gaussian blur (sigma uniform in `blur_sigma`, probability per crop slot), solarize (global crop 2
only), then normalisation (x / 255 - norm_mean) / norm_std.

Blur probabilities follow DINOv2's documented intent (global 1: 1.0, global 2: 0.1, locals: 0.5). DINOv3's released
code effectively uses 0.0 / 0.9 / 0.5 because of an inverted probability (see REFERENCE.md section 4); set
`blur_prob_global1`/`blur_prob_global2` to reproduce that.

Normalisation default: ImageNet's mean/std averaged over RGB (0.449 / 0.226), the statistics the pretrained DINOv3
patch embedding saw, so a single-channel input lands in the range the starting weights expect.

Randomness: every random number comes from the given torch.Generator on the input's device, drawn in a fixed order
and a fixed amount per call whatever the probabilities are, so a seeded run is reproducible, resumable from the
generator's state, and changing one probability (e.g. blur off) leaves every other draw unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dinocell.channels import (
    BRIGHTFIELD_CHANNELS,
    FLUORESCENT_CHANNELS,
    is_transmitted_light,
)
from dinocell.config.augment import CROP_POLICIES, AugmentConfig
from dinocell.data.augment_ops import (
    brightness_contrast,
    crop_resize,
    gaussian_blur,
    max_box_size,
    orientation_as_flips,
    sample_crop_boxes,
    solarize,
)

MEAN_SOURCE = -1  # provenance value for a crop fed by the mean of the fluorescent channels
N_GLOBAL_CROPS = 2


def channel_roles(channel_names: list[str]) -> tuple[list[int], list[int]]:
    """Indices of the fluorescent and of the transmitted-light channels of a batch: dinocell's own names first in
    FLUORESCENT_CHANNELS / BRIGHTFIELD_CHANNELS order (so a JUMP batch in any column order averages and draws
    exactly as before), then the other names in batch order."""
    names = list(channel_names)
    fluo = [names.index(n) for n in FLUORESCENT_CHANNELS if n in names]
    fluo += [i for i, n in enumerate(names) if n not in FLUORESCENT_CHANNELS and not is_transmitted_light(n)]
    light = [names.index(n) for n in BRIGHTFIELD_CHANNELS if n in names]
    light += [i for i, n in enumerate(names) if n not in BRIGHTFIELD_CHANNELS and is_transmitted_light(n)]
    return fluo, light


def slot_mean_probs(cfg: AugmentConfig) -> tuple[list[float], list[float]]:
    """Per crop slot, the probability that the crop shows the fluorescent mean: (global slots, local slots)."""
    if cfg.crop_policy == "multiview":
        return [1.0, 0.0], [cfg.mean_prob_local] * cfg.n_local
    if cfg.crop_policy == "mean_only":  # rand() < 1.0 always: every crop the mean
        return [1.0] * N_GLOBAL_CROPS, [1.0] * cfg.n_local
    if cfg.crop_policy == "single_only":  # rand() < 0.0 never: every crop its own channel draw
        return [0.0] * N_GLOBAL_CROPS, [0.0] * cfg.n_local
    raise ValueError(f"augment.crop_policy: must be one of {list(CROP_POLICIES)}, got {cfg.crop_policy!r}")


@dataclass
class ViewParams:
    """What was done to each crop of one crop group; every tensor has one row per crop, crop-major like the crops."""

    source: torch.Tensor  # long: index into the batch's channel_names, or MEAN_SOURCE (-1) for the fluorescent mean
    box: torch.Tensor  # float [n, 4]: (x0, y0, w, h) in source pixels
    hflip: torch.Tensor  # bool, applied first
    vflip: torch.Tensor  # bool, applied second
    rot90: torch.Tensor  # long 0..3: counter-clockwise quarter turns (torch.rot90, dims (-2, -1)), applied third
    jittered: torch.Tensor  # bool
    brightness: torch.Tensor  # float factor (1.0 where not jittered)
    contrast: torch.Tensor  # float factor (1.0 where not jittered)
    blur_sigma: torch.Tensor  # float, 0.0 where not blurred
    solarized: torch.Tensor  # bool

    @property
    def blurred(self) -> torch.Tensor:
        return self.blur_sigma > 0


@dataclass
class MultiViewBatch:
    """Crops of one batch plus their provenance. Crop-major: row s * batch_size + b is crop slot s of field b."""

    global_crops: torch.Tensor  # float [n_global_crops * B, 1, G, G]
    local_crops: torch.Tensor  # float [n_local_crops * B, 1, L, L]
    global_views: ViewParams
    local_views: ViewParams
    channel_names: tuple[str, ...]
    n_global_crops: int
    n_local_crops: int
    batch_size: int
    brightfield_available: bool  # transmitted-light channels were present (so brightfield_prob > 0 could be honoured)
    field_size: tuple[int, int]  # (H, W) of the source fields
    mean_channels: tuple[str, ...] = ()  # the fluorescent channels averaged into the mean view (MEAN_SOURCE)

    def stats(self) -> dict[str, float]:
        """Rates for monitoring (one host sync): how often each choice was made in this batch."""
        out = {}
        for group, views in (("global", self.global_views), ("local", self.local_views)):
            if views.source.numel() == 0:
                continue
            is_bf = torch.zeros_like(views.blurred)
            for i, name in enumerate(self.channel_names):
                if is_transmitted_light(name):
                    is_bf |= views.source == i
            out[f"{group}/mean_fraction"] = (views.source == MEAN_SOURCE).float().mean()
            out[f"{group}/brightfield_fraction"] = is_bf.float().mean()
            out[f"{group}/blur_fraction"] = views.blurred.float().mean()
            out[f"{group}/solarize_fraction"] = views.solarized.float().mean()
            out[f"{group}/jitter_fraction"] = views.jittered.float().mean()
        values = torch.stack(list(out.values())).tolist()
        return dict(zip(out.keys(), values))


class MultiViewAugment:
    """Build the multi-view DINO crops of a field batch on the batch's device (see the module docstring)."""

    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg if cfg is not None else AugmentConfig()

    def __call__(
        self, fields_u8: torch.Tensor, channel_names: list[str], generator: torch.Generator | None = None,
        iteration: int | None = None,
    ) -> MultiViewBatch:
        """iteration: the training iteration, for augment.curriculum_iters (None: past the curriculum)."""
        fluo_idx, bf_idx = _validate_input(fields_u8, channel_names, generator)
        cfg, turn_prob = curriculum_config(self.cfg, iteration)
        device = fields_u8.device
        batch, _, height, width = fields_u8.shape
        use_bf = cfg.brightfield_prob > 0 and len(bf_idx) > 0
        global_mean, local_mean = slot_mean_probs(cfg)
        if not fluo_idx:
            _check_without_fluorescence(cfg, list(channel_names), global_mean + local_mean, bf_idx)
        sampler = _ViewSampler(cfg, batch, height, width, fluo_idx, bf_idx if use_bf else [], generator, device,
                               turn_prob)

        global_slots = _SlotProbs(
            mean=global_mean, blur=[cfg.blur_prob_global1, cfg.blur_prob_global2], solarize=[0.0, cfg.solarize_prob]
        )
        local_slots = _SlotProbs(
            mean=local_mean,
            blur=[cfg.blur_prob_local] * cfg.n_local,
            solarize=[0.0] * cfg.n_local,
        )
        global_views = sampler.sample(global_slots, cfg.global_scale)
        local_views = sampler.sample(local_slots, cfg.local_scale)

        with torch.no_grad():
            planes = _SourcePlanes(fields_u8, fluo_idx, bf_idx if use_bf else [])
            global_crops = self._render(planes, global_views, cfg.global_size, global_slots, cfg.global_scale)
            local_crops = self._render(planes, local_views, cfg.local_size, local_slots, cfg.local_scale)
        return MultiViewBatch(
            global_crops=global_crops,
            local_crops=local_crops,
            global_views=global_views,
            local_views=local_views,
            channel_names=tuple(channel_names),
            n_global_crops=N_GLOBAL_CROPS,
            n_local_crops=cfg.n_local,
            batch_size=batch,
            brightfield_available=len(bf_idx) > 0,
            field_size=(height, width),
            mean_channels=tuple(channel_names[i] for i in fluo_idx),
        )

    def _render(
        self,
        planes: _SourcePlanes,
        views: ViewParams,
        out_size: int,
        probs: _SlotProbs,
        scale: tuple[float, float],
    ) -> torch.Tensor:
        """Crops of one size group: resample (with flips and turns) per crop slot, batched over the fields; the
        photometric steps over all crops at once. The slot probabilities say statically which steps can occur, so
        steps that cannot are skipped without a device sync."""
        cfg = self.cfg
        batch, height, width = planes.batch, planes.height, planes.width
        if not probs.mean:
            return torch.empty((0, 1, out_size, out_size), device=planes.flat.device)
        max_box = max_box_size(height, width, scale, cfg.ratio)
        method = cfg.resample
        if method == "auto":
            method = "matmul" if planes.flat.device.type == "cuda" else "taps"
        fields = torch.arange(batch, device=planes.flat.device)
        flip_rows, flip_cols, transpose = orientation_as_flips(views.hflip, views.vflip, views.rot90)
        slots = []
        for slot in range(len(probs.mean)):
            part = slice(slot * batch, (slot + 1) * batch)
            plane = planes.index(views.source[part], fields)
            crops = crop_resize(
                planes.flat,
                plane,
                views.box[part],
                out_size,
                max_box=max_box,
                method=method,
                flip_rows=flip_rows[part],
                flip_cols=flip_cols[part],
                transpose=transpose[part],
            )
            slots.append(crops)
        x = torch.cat(slots)
        if cfg.jitter_prob > 0:
            x = brightness_contrast(x, views.brightness, views.contrast)
        if cfg.blur_kernel_size > 1 and any(p > 0 for p in probs.blur):
            x = gaussian_blur(x, views.blur_sigma, cfg.blur_kernel_size)
        if any(p > 0 for p in probs.solarize):
            x = solarize(x, views.solarized, cfg.solarize_threshold)
        x = (x / 255.0 - cfg.norm_mean) / cfg.norm_std
        return x[:, None]


class _SourcePlanes:
    """Float copies of the channels a crop may show plus the fluorescent mean (last), as planes [B * P, H, W], so a
    crop addresses its source as one plane index, field * P + position: no per-slot image copies."""

    def __init__(self, fields_u8: torch.Tensor, fluo_idx: list[int], extra_idx: list[int]):
        self.batch, channels, self.height, self.width = fields_u8.shape
        used = fluo_idx + extra_idx
        self.per_field = len(used) + 1
        planes = torch.empty(
            (self.batch, self.per_field, self.height, self.width), dtype=torch.float32, device=fields_u8.device
        )
        for position, channel in enumerate(used):
            planes[:, position] = fields_u8[:, channel]
        if fluo_idx:
            torch.mean(planes[:, : len(fluo_idx)], dim=1, out=planes[:, -1])
        else:  # no fluorescent channel: no crop reads the mean (checked before sampling); zeros, not the NaN of mean([])
            planes[:, -1].zero_()
        self.flat = planes.view(self.batch * self.per_field, self.height, self.width)
        position_of_channel = [used.index(c) if c in used else -1 for c in range(channels)]
        self.position = _device_constant(position_of_channel, torch.long, fields_u8.device)

    def index(self, source: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """Plane index of each crop's source (a channel index, or MEAN_SOURCE) in field fields[i]."""
        position = torch.where(source == MEAN_SOURCE, self.per_field - 1, self.position[source.clamp(min=0)])
        return fields * self.per_field + position


@dataclass
class _SlotProbs:
    """Per crop slot of a group: probability of the fluorescent mean as source, of blur, of solarize."""

    mean: list[float]
    blur: list[float]
    solarize: list[float]


def curriculum_config(cfg: AugmentConfig, iteration: int | None) -> tuple[AugmentConfig, float]:
    """(the settings at `iteration`, the probability that a crop's quarter turn is kept) under
    augment.curriculum_iters: cfg itself and 1.0 when it is off or over."""
    if not cfg.curriculum_iters or iteration is None or iteration >= cfg.curriculum_iters:
        return cfg, 1.0
    t = max(iteration, 0) / cfg.curriculum_iters
    low, high = cfg.global_scale
    start = cfg.curriculum_start_scale
    return replace(cfg, global_scale=(start + t * (low - start), high), hflip_prob=t * cfg.hflip_prob,
                   vflip_prob=t * cfg.vflip_prob), t


class _ViewSampler:
    """Draws the per-crop parameters of a crop group, all from one generator in a fixed order and amount (one more
    draw per crop while a curriculum thins the quarter turns, turn_prob < 1)."""

    def __init__(self, cfg, batch, height, width, fluo_idx, bf_idx, generator, device, turn_prob: float = 1.0):
        self.turn_prob = turn_prob
        self.cfg, self.batch, self.height, self.width = cfg, batch, height, width
        self.generator, self.device = generator, device
        self.bf_idx = _device_constant(bf_idx, torch.long, device) if bf_idx else None
        # Without fluorescent channels every single choice is transmitted light (brightfield_prob == 1, checked):
        # draw the placeholder fluorescent pick from those so the draws stay the same in number and order.
        self.fluo_idx = _device_constant(fluo_idx, torch.long, device) if fluo_idx else self.bf_idx

    def rand(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=self.device)

    def per_slot(self, values: list[float]) -> torch.Tensor:
        """One value per crop slot, repeated over the fields (crop-major)."""
        return _device_constant(values, torch.float32, self.device).repeat_interleave(self.batch)

    def pick(self, options: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Uniform choice among options from uniform draws u (one per crop)."""
        slot = (u * len(options)).long().clamp(max=len(options) - 1)
        return options[slot]

    def sample(self, probs: _SlotProbs, scale: tuple[float, float]) -> ViewParams:
        cfg = self.cfg
        n = len(probs.mean) * self.batch
        u_mean, u_bf, u_fluo_ch, u_bf_ch = (self.rand(n) for _ in range(4))
        single = self.pick(self.fluo_idx, u_fluo_ch)
        if self.bf_idx is not None:
            single = torch.where(u_bf < cfg.brightfield_prob, self.pick(self.bf_idx, u_bf_ch), single)
        source = torch.where(u_mean < self.per_slot(probs.mean), torch.full_like(single, MEAN_SOURCE), single)

        box = sample_crop_boxes(
            n, self.height, self.width, scale, cfg.ratio, self.generator, self.device, cfg.crop_attempts
        )
        hflip = self.rand(n) < cfg.hflip_prob
        vflip = self.rand(n) < cfg.vflip_prob
        rot90 = (self.rand(n) * 4).long().clamp(max=3)
        if not cfg.rotate90:
            rot90 = torch.zeros_like(rot90)
        elif self.turn_prob < 1.0:
            rot90 = torch.where(self.rand(n) < self.turn_prob, rot90, torch.zeros_like(rot90))

        jittered = self.rand(n) < cfg.jitter_prob
        brightness = 1.0 + cfg.brightness * (2.0 * self.rand(n) - 1.0)
        contrast = 1.0 + cfg.contrast * (2.0 * self.rand(n) - 1.0)
        brightness = torch.where(jittered, brightness, torch.ones_like(brightness))
        contrast = torch.where(jittered, contrast, torch.ones_like(contrast))

        blurred = self.rand(n) < self.per_slot(probs.blur)
        sigma_lo, sigma_hi = cfg.blur_sigma
        sigma = sigma_lo + (sigma_hi - sigma_lo) * self.rand(n)
        blur_sigma = torch.where(blurred, sigma, torch.zeros_like(sigma))

        solarized = self.rand(n) < self.per_slot(probs.solarize)
        return ViewParams(source, box, hflip, vflip, rot90, jittered, brightness, contrast, blur_sigma, solarized)


def _device_constant(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor built on the device from fills: torch.tensor(..., device="cuda") is a blocking
    host-to-device copy that would wait for all queued GPU work (e.g. the previous training step)."""
    if not values:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.stack([torch.full((), v, dtype=dtype, device=device) for v in values])


def _check_without_fluorescence(cfg: AugmentConfig, names: list[str], mean_probs: list[float], light: list[int]):
    """A batch without fluorescent channels works only for single_only with every choice transmitted light."""
    rule = "transmitted light by is_transmitted_light: BRIGHTFIELD_CHANNELS, 'bright', 'phase', '...bf', 'dic'"
    if any(p > 0 for p in mean_probs):
        raise ValueError(
            f"MultiViewAugment: augment.crop_policy={cfg.crop_policy!r} shows the mean of the fluorescent channels, "
            f"but channel_names {names} has no fluorescent channel (all are {rule}); add one to data.channels or "
            "use augment.crop_policy=single_only with augment.brightfield_prob=1.0"
        )
    if not (light and cfg.brightfield_prob == 1.0):
        raise ValueError(
            f"MultiViewAugment: channel_names {names} has no fluorescent channel (all are {rule}), so every "
            f"single-channel crop must be transmitted light: set augment.brightfield_prob=1.0 "
            f"(it is {cfg.brightfield_prob})"
        )


def _validate_input(fields_u8, channel_names, generator) -> tuple[list[int], list[int]]:
    """Check the batch; return the indices of the fluorescent and transmitted-light channels (channel_roles)."""
    where = "MultiViewAugment"
    if not isinstance(fields_u8, torch.Tensor):
        raise TypeError(f"{where}: fields_u8 must be a torch.Tensor, got {type(fields_u8).__name__}")
    if fields_u8.dtype != torch.uint8:
        raise TypeError(f"{where}: fields_u8 must be uint8 (preprocessed fields), got {fields_u8.dtype}")
    if fields_u8.dim() != 4:
        raise ValueError(f"{where}: fields_u8 must be [B, C, H, W], got shape {tuple(fields_u8.shape)}")
    batch, channels, height, width = fields_u8.shape
    if batch == 0 or height == 0 or width == 0:
        raise ValueError(f"{where}: empty batch, shape {tuple(fields_u8.shape)}")
    names = list(channel_names)
    if len(names) != channels:
        raise ValueError(f"{where}: {len(names)} channel_names {names} for {channels} channels in fields_u8")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"{where}: channel names must be non-empty strings, got {bad} in {names}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where}: duplicate channel names {duplicates} in {names}")
    if generator is not None and not _same_device(generator.device, fields_u8.device):
        raise ValueError(
            f"{where}: generator is on {generator.device} but fields_u8 is on {fields_u8.device}; "
            "create the generator on the input's device"
        )
    return channel_roles(names)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    index_a = a.index if a.index is not None else (torch.cuda.current_device() if a.type == "cuda" else None)
    index_b = b.index if b.index is not None else (torch.cuda.current_device() if b.type == "cuda" else None)
    return index_a == index_b
