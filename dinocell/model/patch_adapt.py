"""Patch 16 -> 8 and RGB -> 1 channel: adapting the DINOv3 patch-embedding kernel to dinocell's input.

- patch size: FlexiViT's pseudo-inverse resize (`patch_embed_resize`, method "pinv"): the 8x8 kernel whose response
  to a downsampled patch best matches the 16x16 kernel's response to the original patch;
- input channels: a C-channel kernel summed over its input channels for a 1-channel model, which is exactly the
  C-channel model applied to the grey image repeated C times.
`adapt_patch_kernel` applies both to a state dict on its way into a model (dinocell.model.pretrained).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PATCH_KERNEL_KEY = "patch_embed.proj.weight"


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
    """Sum a [C_out, C, h, w] kernel over C for a 1-channel model (== the C-channel model on grey repeated C times)."""
    if weight.shape[1] == in_chans:
        return weight
    if in_chans != 1:
        raise ValueError(f"cannot adapt a {weight.shape[1]}-channel patch kernel to {in_chans} channels (only to 1)")
    return weight.sum(dim=1, keepdim=True)



def adapt_patch_kernel(
    state: dict[str, Tensor], target: Mapping[str, Tensor], method: str = "pinv"
) -> list[AdaptedKey]:
    """Fold input channels and resize the patch kernel in `state` (in place) to the target's shape, if needed.

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
        weight = fold_input_channels(weight, 1)
        steps.append(f"summed {old[1]} input channels")
    if tuple(weight.shape[-2:]) != tuple(want[-2:]):
        weight = patch_embed_resize(weight, tuple(want[-2:]), method=method)
        steps.append(f"{method} resize {old[2]}x{old[3]} -> {want[2]}x{want[3]}")
    state[PATCH_KERNEL_KEY] = weight
    return [AdaptedKey(PATCH_KERNEL_KEY, old, tuple(weight.shape), "; ".join(steps))]
