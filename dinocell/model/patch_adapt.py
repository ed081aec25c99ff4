"""Patch 16 -> 8 and RGB -> 1 channel: adapting the DINOv3 patch-embedding kernel to dinocell's input.

- patch size: FlexiViT's pseudo-inverse resize (`patch_embed_resize`, method "pinv"): the 8x8 kernel whose response
  to a downsampled patch best matches the 16x16 kernel's response to the original patch;
- input channels and normalisation (`fold_input_normalisation`): DINOv3 was trained on RGB normalised per channel
  with ImageNet's mean/std; dinocell feeds one grey plane normalised with one mean/std (augment.norm_mean /
  norm_std). The C-channel kernel and its bias are folded into a 1-channel kernel and bias so that the 1-channel
  model on the dinocell-normalised grey image equals the C-channel model on that grey image repeated C times and
  normalised per channel, exactly (derivation at the function). Summing the kernel over its inputs
  (`fold_input_channels`) is the special case of equal normalisations.
`adapt_patch_kernel` applies both to a state dict on its way into a model (dinocell.model.pretrained).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PATCH_KERNEL_KEY = "patch_embed.proj.weight"
PATCH_BIAS_KEY = "patch_embed.proj.bias"

# The per-channel (R, G, B) normalisation DINOv3 was trained with (on x / 255), i.e. what its RGB kernel expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputNorm:
    """A per-channel input normalisation z_c = (x_c / 255 - mean_c) / std_c (one value each for a grey input)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"InputNorm: mean {self.mean} and std {self.std} must have the same, non-zero length")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"InputNorm: every std must be > 0, got {self.std}")

    def describe(self) -> str:
        return f"mean {_slashed(self.mean)}, std {_slashed(self.std)}"


def _slashed(values: tuple[float, ...]) -> str:
    return "/".join(f"{v:g}" for v in values)


IMAGENET_NORM = InputNorm(IMAGENET_MEAN, IMAGENET_STD)


@dataclass
class AdaptedKey:
    key: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    how: str


def resize_matrix(
    old_size: tuple[int, int], new_size: tuple[int, int], interpolation: str = "bilinear", antialias: bool = True
) -> Tensor:
    """The matrix A [new_h*new_w, old_h*old_w] with resize(x).flatten() == A @ x.flatten() for any patch x.

    Built column by column by resizing each one-hot basis kernel (resizing is linear).
    """
    n_old = old_size[0] * old_size[1]
    basis = torch.eye(n_old, dtype=torch.float64).reshape(n_old, 1, *old_size)
    resized = F.interpolate(basis, size=new_size, mode=interpolation, antialias=antialias, align_corners=False)
    return resized.reshape(n_old, -1).T.contiguous()


def patch_embed_resize(
    weight: Tensor,
    new_size: int | tuple[int, int],
    method: str = "pinv",
    interpolation: str = "bilinear",
    antialias: bool = True,
) -> Tensor:
    """Resize a patch-embedding kernel [C_out, C_in, h, w] to new_size.

    method "pinv" (FlexiViT PI-resize): a patch x of the old size becomes A x at the new size (A from
    `resize_matrix`, i.e. the image is resized with the same interpolation). We want <A x, w_new> = <x, w_old> for
    every x, i.e. A^T w_new = w_old, solved as w_new = pinv(A^T) w_old; in row form
    w_new = w_old.reshape(C_out, C_in, h*w) @ pinv(A). Exact when enlarging (A has full column rank, so
    pinv(A) A = I); least squares when shrinking (16 -> 8: 256 equations, 64 unknowns).
    method "bilinear": resize the kernel itself like an image (the naive baseline; it does not preserve the
    response, e.g. 16 -> 8 scales a constant patch's response by about 1/4).
    The bias is unaffected by either method. Computed in float64, returned in the input dtype.
    """
    if weight.ndim != 4:
        raise ValueError(f"patch_embed_resize: expected a kernel [C_out, C_in, h, w], got shape {tuple(weight.shape)}")
    new_hw = (new_size, new_size) if isinstance(new_size, int) else tuple(new_size)
    old_hw = tuple(weight.shape[-2:])
    if new_hw == old_hw:
        return weight.clone()
    c_out, c_in = weight.shape[:2]
    w64 = weight.detach().to(torch.float64)
    if method == "bilinear":
        out = F.interpolate(w64, size=new_hw, mode=interpolation, antialias=antialias, align_corners=False)
    elif method == "pinv":
        a = resize_matrix(old_hw, new_hw, interpolation, antialias)
        out = (w64.reshape(c_out, c_in, -1) @ torch.linalg.pinv(a)).reshape(c_out, c_in, *new_hw)
    else:
        raise ValueError(f"patch_embed_resize: unknown method {method!r} (use 'pinv' or 'bilinear')")
    return out.to(weight.dtype)


def fold_input_channels(weight: Tensor, in_chans: int) -> Tensor:
    """Sum a [C_out, C, h, w] kernel over C for a 1-channel model (== the C-channel model on grey repeated C times,
    when every channel is normalised alike; see `fold_input_normalisation` for DINOv3's per-channel statistics)."""
    if weight.shape[1] == in_chans:
        return weight
    if in_chans != 1:
        raise ValueError(f"cannot adapt a {weight.shape[1]}-channel patch kernel to {in_chans} channels (only to 1)")
    return weight.sum(dim=1, keepdim=True)


def fold_input_normalisation(weight: Tensor, bias: Tensor, source: InputNorm, target: InputNorm) -> tuple[Tensor, Tensor]:
    """Fold a C-channel kernel [C_out, C, h, w] and bias [C_out] trained on inputs normalised with `source` (per
    channel) into a 1-channel kernel [C_out, 1, h, w] and bias for grey inputs normalised with `target` (one value).

    Derivation. Let g = x / 255 be the grey patch. The C-channel model sees z_c = (g - m_c) / s_c in channel c; the
    1-channel model sees z = (g - m) / s, i.e. g = s z + m. With <., .> the sum over the h x w patch and 1 the
    all-ones patch:

        y = b + sum_c <W_c, z_c> = b + sum_c <W_c, (s z + m - m_c) / s_c>
          = <s * sum_c W_c / s_c, z> + b + sum_c ((m - m_c) / s_c) * <W_c, 1>

    so  W' = s * sum_c W_c / s_c   and   b' = b + sum_c ((m - m_c) / s_c) * sum_hw W_c,
    exact for every patch (a per-channel affine map of the input composes with the linear patch projection).
    With m_c = m and s_c = s it is the plain channel sum. Computed in float64, returned in the input dtypes.
    """
    c_in = weight.shape[1]
    if weight.ndim != 4 or bias.shape != (weight.shape[0],):
        raise ValueError(f"fold_input_normalisation: expected a kernel [C_out, C, h, w] and a bias [C_out], got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if len(source.mean) != c_in:
        raise ValueError(f"fold_input_normalisation: source normalisation has {len(source.mean)} channels "
                         f"({source.describe()}), the kernel {c_in}")
    if len(target.mean) != 1:
        raise ValueError(f"fold_input_normalisation: the target must be one grey channel, got {target.describe()}")
    w64 = weight.detach().to(torch.float64)
    m_c = torch.tensor(source.mean, dtype=torch.float64)
    s_c = torch.tensor(source.std, dtype=torch.float64)
    m, s = float(target.mean[0]), float(target.std[0])
    folded = s * (w64 / s_c.view(1, -1, 1, 1)).sum(dim=1, keepdim=True)
    shift = (w64.sum(dim=(2, 3)) * ((m - m_c) / s_c).view(1, -1)).sum(dim=1)
    return folded.to(weight.dtype), (bias.detach().to(torch.float64) + shift).to(bias.dtype)


def adapt_patch_kernel(
    state: dict[str, Tensor],
    target: Mapping[str, Tensor],
    method: str = "pinv",
    source_norm: InputNorm | None = IMAGENET_NORM,
    target_norm: InputNorm | None = None,
) -> list[AdaptedKey]:
    """Fold input channels and resize the patch kernel in `state` (in place) to the target's shape, if needed.

    C -> 1 channels: with `source_norm` (the checkpoint's per-channel input statistics, DINOv3's ImageNet ones by
    default) the kernel and bias are folded for grey inputs normalised with `target_norm` (required then); with
    source_norm=None the kernel is only summed over its inputs (the checkpoint saw every channel normalised like the
    target). The fold comes before the resize, so the bias absorbs the mean shift exactly at the checkpoint's own
    patch size; the resize (linear in the kernel, bias untouched) then only approximates the zero-mean part.
    Leaves the entry as is when the output width differs (that is reported later as a shape error).
    """
    if PATCH_KERNEL_KEY not in state or PATCH_KERNEL_KEY not in target:
        return []
    weight, want = state[PATCH_KERNEL_KEY], target[PATCH_KERNEL_KEY].shape
    if weight.shape == want or weight.ndim != 4 or weight.shape[0] != want[0]:
        return []
    old, steps = tuple(weight.shape), []
    if weight.shape[1] != want[1]:
        if want[1] != 1:
            return []  # only C -> 1 is exact; the shape error names the key
        if source_norm is None:
            weight = fold_input_channels(weight, 1)
            steps.append(f"summed {old[1]} input channels")
        else:
            if target_norm is None:
                raise ValueError(f"{PATCH_KERNEL_KEY}: folding {old[1]} channels normalised with "
                                 f"{source_norm.describe()} needs the target's normalisation (target_norm)")
            if PATCH_BIAS_KEY not in state:
                raise ValueError(f"{PATCH_BIAS_KEY} is not in the checkpoint: the input-normalisation fold of "
                                 f"{PATCH_KERNEL_KEY} needs it (or pass source_norm=None to only sum the channels)")
            weight, state[PATCH_BIAS_KEY] = fold_input_normalisation(weight, state[PATCH_BIAS_KEY], source_norm,
                                                                     target_norm)
            steps.append(f"folded {old[1]} input channels ({source_norm.describe()} -> {target_norm.describe()}; "
                         f"{PATCH_BIAS_KEY} shifted)")
    if tuple(weight.shape[-2:]) != tuple(want[-2:]):
        weight = patch_embed_resize(weight, tuple(want[-2:]), method=method)
        steps.append(f"{method} resize {old[2]}x{old[3]} -> {want[2]}x{want[3]}")
    state[PATCH_KERNEL_KEY] = weight
    return [AdaptedKey(PATCH_KERNEL_KEY, old, tuple(weight.shape), "; ".join(steps))]
