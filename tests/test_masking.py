"""iBOT masks: exact counts, ratio spread, half masked, determinism, block contiguity, iBOT bookkeeping."""

import numpy as np
import pytest
import torch

from dinocell.loss import MaskBatch, MaskingGenerator, as_numpy_rng, collate_masks, mask_counts, masked_patch_weights

GRIDS = [(28, 28), (14, 14), (6, 6), (3, 5), (2, 2), (1, 1)]  # 28x28: 224 px at patch 8


def masked_neighbours(mask: np.ndarray) -> float:
    """Mean number of masked 4-neighbours of a masked patch."""
    padded = np.pad(mask, 1).astype(int)
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    return float(neighbours[mask].mean())


@pytest.mark.parametrize("grid", GRIDS)
def test_block_masks_have_the_exact_count(grid):
    rng = np.random.default_rng(0)
    generator = MaskingGenerator(grid)
    n_patches = grid[0] * grid[1]
    counts = sorted({0, 1, n_patches // 10, n_patches // 3, n_patches // 2, n_patches - 1, n_patches})
    for count in counts:
        for _ in range(15):
            mask = generator(count, rng)
            assert mask.shape == grid and mask.dtype == bool
            assert int(mask.sum()) == count


def test_block_masks_are_contiguous_unlike_random_masks():
    rng = np.random.default_rng(1)
    for grid in [(28, 28), (14, 14)]:
        generator = MaskingGenerator(grid)
        n_patches = grid[0] * grid[1]
        for ratio in (0.1, 0.3, 0.5):
            count = int(n_patches * ratio)
            block = np.mean([masked_neighbours(generator(count, rng)) for _ in range(20)])
            scattered = []
            for _ in range(20):
                flat = np.zeros(n_patches, dtype=bool)
                flat[rng.choice(n_patches, count, replace=False)] = True
                scattered.append(masked_neighbours(flat.reshape(grid)))
            # Measured: blocks 2.5-3.7 masked neighbours, random 0.35-1.9 at these ratios.
            assert block >= 2.0 and block >= np.mean(scattered) + 1.0, (grid, ratio, block, np.mean(scattered))


def test_block_shapes_respect_the_area_and_aspect_limits():
    # One block on an empty grid is a filled rectangle with sides round(sqrt(area / a)), round(sqrt(area * a)),
    # target area in [4, budget], a in [0.3, 1 / 0.3]. Rounding the sides widens h / w to [1/4, 4] (area 4, a = 0.3:
    # 4 x 1) and can make a 3-patch block (area 4, a ~ 2.2: 1 x 3), as in DINOv3.
    rng = np.random.default_rng(2)
    generator = MaskingGenerator((28, 28))
    aspects = []
    for _ in range(300):
        mask = np.zeros((28, 28), dtype=bool)
        added = generator._add_block(mask, 100, rng)
        rows, cols = np.nonzero(mask)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert added == h * w == mask.sum()
        assert 3 <= added <= 100
        assert 0.25 <= h / w <= 4
        aspects.append(np.log(h / w))
    # log-uniform aspect: symmetric around 1, both orientations common.
    assert (
        abs(np.mean(aspects)) < 0.15
        and np.mean(np.array(aspects) > 0.3) > 0.2
        and np.mean(np.array(aspects) < -0.3) > 0.2
    )


def test_masking_generator_rejects_impossible_counts():
    with pytest.raises(ValueError, match="cannot mask 17 patches of a 4x4 grid"):
        MaskingGenerator((4, 4))(17, 0)


def test_mask_counts_spread_evenly_over_the_ratio_range():
    assert mask_counts(8, 784) == [156, 235, 313, 392]  # 784 * (0.2, 0.3, 0.4, 0.5)
    counts = mask_counts(128, 784)
    assert len(counts) == 64
    ratios = np.array(counts) / 784
    assert ratios.min() >= 0.1 and ratios.max() == 0.5
    np.testing.assert_allclose(np.diff(ratios), 0.4 / 64, atol=1.5 / 784)  # even steps up to flooring
    assert mask_counts(7, 100, (0.1, 0.5), 0.5) == [23, 36, 50]  # int(7 * 0.5) = 3 masked images


@pytest.mark.parametrize("grid", [(28, 28), (6, 6)])
def test_collate_masks_half_masked_with_exact_counts_and_consistent_indices(grid):
    n_images = 16
    batch = collate_masks(n_images, grid, generator=np.random.default_rng(3))
    n_patches = grid[0] * grid[1]
    assert batch.masks.shape == (n_images, n_patches) and batch.masks.dtype == torch.bool
    per_image = batch.masks.sum(dim=1)
    assert int((per_image > 0).sum()) == n_images // 2
    assert sorted(per_image[per_image > 0].tolist()) == mask_counts(n_images, n_patches)
    assert batch.n_images == n_images
    assert batch.n_masked_patches == int(per_image.sum()) == batch.mask_indices.numel()
    # mask_indices index the flattened [n_images * HW] patch tokens; weights sum to 1 over each masked image.
    assert torch.equal(
        batch.masks.reshape(-1)[batch.mask_indices], torch.ones(batch.n_masked_patches, dtype=torch.bool)
    )
    image_of_patch = batch.mask_indices // n_patches
    weight_per_image = torch.zeros(n_images).index_add_(0, image_of_patch, batch.masks_weight)
    torch.testing.assert_close(weight_per_image, (per_image > 0).float())


def test_collate_masks_shuffles_which_images_are_masked():
    masked_rows = set()
    for seed in range(20):
        batch = collate_masks(8, (6, 6), generator=np.random.default_rng(seed))
        masked_rows.update(torch.nonzero(batch.masks.any(dim=1)).flatten().tolist())
    assert masked_rows == set(range(8))


def test_collate_masks_is_deterministic_and_uses_no_global_rng():
    np.random.seed(0)
    torch.manual_seed(0)
    numpy_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    first = collate_masks(12, (14, 14), generator=torch.Generator().manual_seed(7))
    # Global RNGs untouched, and reseeding them does not change the result.
    assert np.array_equal(np.random.get_state()[1], numpy_state) and torch.equal(torch.get_rng_state(), torch_state)
    np.random.seed(123)
    torch.manual_seed(123)
    again = collate_masks(12, (14, 14), generator=torch.Generator().manual_seed(7))
    other = collate_masks(12, (14, 14), generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.masks, again.masks)
    assert not torch.equal(first.masks, other.masks)
    assert torch.equal(
        collate_masks(12, (14, 14), generator=5).masks,
        collate_masks(12, (14, 14), generator=np.random.default_rng(5)).masks,
    )


def test_mask_batch_from_masks_matches_ibot_weights():
    masks = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    batch = MaskBatch.from_masks(masks)
    assert batch.mask_indices.tolist() == [1, 2, 8, 9, 10, 11]
    torch.testing.assert_close(batch.masks_weight, torch.tensor([0.5, 0.5, 0.25, 0.25, 0.25, 0.25]))
    torch.testing.assert_close(batch.masks_weight, masked_patch_weights(masks))
    assert batch.n_masked_patches == 6


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mask_ratio_range"):
        collate_masks(4, (6, 6), mask_ratio_range=(0.6, 0.2), generator=0)
    with pytest.raises(ValueError, match="n_global_images"):
        collate_masks(0, (6, 6), generator=0)
    with pytest.raises(TypeError, match="numpy Generator"):
        as_numpy_rng("seed")
