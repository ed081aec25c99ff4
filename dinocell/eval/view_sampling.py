"""Independent views of a held-out field: every channel view (and the mean view) gets its own crop, flip and turn.

Why: with whole, aligned fields every view of a field shows the cells at the same positions, so layout alone finds
the field (an 8x8 average-pooled pixel vector scores cross-channel top-1 1.00). With an independent random crop
(area fraction in `scale`, aspect ratio w/h log-uniform in `ratio`, as the training's global crops), a horizontal
flip and a quarter turn per view, two views of one field share content, not layout. The orientations (the 8
elements of the square's symmetry group: flip or not x 4 turns) are dealt to the views of a field as a random
permutation, fluorescent channels first, then the mean view: no two of those views of a field share an orientation
(with independent orientations 1 pair in 8 would, and an overlapping crop in the same orientation is layout again:
measured on the demo, pixels 8x8 top-1 0.078 -> 0.024 at chance 0.021). Views beyond the 8th (with JUMP's 5 + 3
channels, the last brightfield plane) get the permutation's elements again, in order.

Reproducible by construction: the parameters of (field, view) are drawn from their own torch.Generator seeded with
the first 8 bytes of sha256("<seed>/<field_id>/<view>") (`view_generator_seed`): one box by
dinocell.data.augment_ops.sample_crop_boxes (10 tries, centre-crop fallback), then one uniform number for the flip
(< 0.5: flip) and one integer in [0, 4) for the turn (kept in the stream, then replaced by the field's dealt
orientation: `field_orientations`, torch.randperm(8) from the generator of sha256("<seed>/<field_id>/orientations")).
A view's box does not depend on which other fields or views are evaluated, and `ViewSpec.render` rebuilds it from
its record alone. The crop is resized to the view size with the
antialiased triangle filter of the training crops (equal to F.interpolate(bilinear, antialias=True) on whole-pixel
boxes), then flipped left-right, then turned counter-clockwise (torch.rot90).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch

from dinocell.channels import is_fluorescent
from dinocell.data.augment_ops import crop_resize, orientation_as_flips, sample_crop_boxes
from dinocell.monitor.consistency import MEAN_VIEW

__all__ = [
    "DEFAULT_RATIO",
    "DEFAULT_SCALE",
    "DERIVATION",
    "VIEW_MODES",
    "IndependentViews",
    "ViewSpec",
    "normalised_planes",
    "parse_view_modes",
    "field_orientations",
    "render_boxes",
    "sample_view_spec",
    "view_generator_seed",
]

VIEW_MODES = ("independent", "aligned")
DEFAULT_SCALE = (0.32, 1.0)  # configs/vits8_jump.yaml augment.global_scale
DEFAULT_RATIO = (3 / 4, 4 / 3)  # AugmentConfig.ratio
DERIVATION = ("torch.Generator().manual_seed(int.from_bytes(sha256(f'{seed}/{field_id}/{view}')[:8], 'little')); "
              "box = dinocell.data.augment_ops.sample_crop_boxes(1, H, W, scale, ratio, generator) as (x0, y0, w, h); "
              "hflip = torch.rand(1) < 0.5; rot90 = torch.randint(0, 4, (1,)); then (hflip, rot90) = the field's dealt "
              "orientation: perm = torch.randperm(8, generator seeded from sha256(f'{seed}/{field_id}/orientations')); "
              "views ordered fluorescent channels, mean, other channels; view k gets element perm[k % 8] = "
              "(hflip = e // 4 == 1, rot90 = e % 4); render: crop -> resize (antialiased) -> flip left-right -> "
              "torch.rot90(k=rot90)")


def parse_view_modes(mode: str) -> list[str]:
    """"independent" | "aligned" | "both" -> the modes to evaluate, independent first."""
    if mode == "both":
        return list(VIEW_MODES)
    if mode not in VIEW_MODES:
        raise ValueError(f"evaluate: view mode must be 'independent', 'aligned' or 'both', got {mode!r}")
    return [mode]


def view_generator_seed(seed: int, field_id: str, view: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}/{field_id}/{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)  # manual_seed takes a non-negative int64


@dataclass(frozen=True)
class ViewSpec:
    """One view's crop box (pixels of the preprocessed field, fractional), flip and quarter turns."""

    x0: float
    y0: float
    w: float
    h: float
    hflip: bool
    rot90: int
    field_hw: tuple[int, int]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["field_hw"] = list(self.field_hw)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViewSpec:
        return cls(float(d["x0"]), float(d["y0"]), float(d["w"]), float(d["h"]), bool(d["hflip"]), int(d["rot90"]),
                   tuple(int(v) for v in d["field_hw"]))

    def render(self, plane: torch.Tensor, size: int) -> torch.Tensor:
        """This view of one float plane [H, W] (any scale: the ops are linear): [size, size]."""
        return _render(plane[None], [self], size)[0]


def field_orientations(seed: int, field_id: str, views: list[str]) -> dict[str, tuple[bool, int]]:
    """(hflip, rot90) per view: the 8 orientations dealt as a random permutation, fluorescent channels first, then
    the mean view, then the other channels."""
    order = ([v for v in views if v != MEAN_VIEW and is_fluorescent(v)] + [v for v in views if v == MEAN_VIEW]
             + [v for v in views if v != MEAN_VIEW and not is_fluorescent(v)])
    g = torch.Generator().manual_seed(view_generator_seed(seed, field_id, "orientations"))
    perm = torch.randperm(8, generator=g).tolist()
    return {v: (perm[k % 8] // 4 == 1, perm[k % 8] % 4) for k, v in enumerate(order)}


def sample_view_spec(seed: int, field_id: str, view: str, field_hw: tuple[int, int],
                     scale: tuple[float, float] = DEFAULT_SCALE,
                     ratio: tuple[float, float] = DEFAULT_RATIO,
                     orientation: tuple[bool, int] | None = None) -> ViewSpec:
    """The view's parameters, drawn as the module docstring says (`orientation`: the field's dealt one)."""
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"evaluate: view scale must satisfy 0 < low <= high <= 1, got {list(scale)}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"evaluate: view ratio must satisfy 0 < low <= high, got {list(ratio)}")
    g = torch.Generator().manual_seed(view_generator_seed(seed, field_id, view))
    h, w = (int(v) for v in field_hw)
    box = sample_crop_boxes(1, h, w, tuple(scale), tuple(ratio), g, torch.device("cpu"))[0].tolist()
    hflip = bool(torch.rand(1, generator=g).item() < 0.5)
    rot = int(torch.randint(0, 4, (1,), generator=g).item())
    if orientation is not None:
        hflip, rot = bool(orientation[0]), int(orientation[1])
    return ViewSpec(box[0], box[1], box[2], box[3], hflip, rot, (h, w))


def _render(planes: torch.Tensor, specs: list[ViewSpec], size: int) -> torch.Tensor:
    """planes [n, H, W] float, one spec each -> [n, size, size]."""
    device = planes.device
    boxes = torch.tensor([[s.x0, s.y0, s.w, s.h] for s in specs], dtype=torch.float32, device=device)
    hflip = torch.tensor([s.hflip for s in specs], dtype=torch.bool, device=device)
    rot = torch.tensor([s.rot90 for s in specs], dtype=torch.long, device=device)
    return render_boxes(planes, boxes, hflip, rot, size)


def render_boxes(planes: torch.Tensor, boxes: torch.Tensor, hflip: torch.Tensor, rot90: torch.Tensor,
                 size: int) -> torch.Tensor:
    """A view's render as tensors: planes [n, H, W], boxes [n, 4] (x0, y0, w, h), hflip [n] bool, rot90 [n]
    -> [n, size, size] (crop -> resize -> flip left-right -> turn counter-clockwise)."""
    flip_rows, flip_cols, transpose = orientation_as_flips(hflip, torch.zeros_like(hflip), rot90)
    return crop_resize(planes.float(), torch.arange(planes.shape[0], device=planes.device), boxes, size,
                       flip_rows=flip_rows, flip_cols=flip_cols, transpose=transpose)


class IndependentViews:
    """A `views_fn` for consistency.embed_views: the views of fields[start:start+b] cut by their ViewSpecs.

    specs[i][view] is field i's spec (evaluation order). Views are normalised like field_views ((x/255 - mean)/std,
    the mean view the mean of the normalised fluorescent channels) before cropping; all ops are linear, so the order
    does not matter.
    """

    def __init__(self, specs: list[dict[str, ViewSpec]], channel_names: list[str], size: int, mean: float,
                 std: float):
        self.specs, self.channels, self.size, self.mean, self.std = specs, list(channel_names), size, mean, std

    def __call__(self, fields_u8: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        out = {}
        for view, x in normalised_planes(fields_u8, self.channels, self.mean, self.std).items():
            specs = [self.specs[start + i][view] for i in range(x.shape[0])]
            out[view] = _render(x[:, 0], specs, self.size)[:, None]
        return out


def normalised_planes(fields_u8: torch.Tensor, channels: list[str], mean: float, std: float) -> dict:
    """{view: [B, 1, H, W]} at the field's own size: field_views without the resize ("mean" first)."""
    x = (fields_u8.float() / 255.0 - mean) / std
    fluo = [i for i, n in enumerate(channels) if is_fluorescent(n)]
    out = {MEAN_VIEW: x[:, fluo].mean(dim=1, keepdim=True)} if fluo else {}
    for i, name in enumerate(channels):
        out[name] = x[:, i : i + 1]
    return out
