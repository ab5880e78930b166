"""Tests of the training views and synthetic anomalies in h2vlr.augment."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from h2vlr.augment import (
    AugmentConfig,
    TrainingView,
    cut_paste,
    make_training_views,
    perlin_blend,
    perlin_noise,
)

SIZE = 48


def _structured_image(height: int, width: int, seed: int) -> Image.Image:
    """Return an RGB image with gradients, a checkerboard and noise, so every region differs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [x * 255 // width, y * 255 // height, ((x // 6 + y // 6) % 2) * 180], axis=-1
    ).astype(np.int64)
    pixels += rng.integers(0, 40, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture
def support_images() -> list[Image.Image]:
    return [
        _structured_image(64, 80, seed=0),
        _structured_image(50, 50, seed=1).convert("L"),
        _structured_image(40, 70, seed=2),
    ]


def _as_array(view: TrainingView) -> np.ndarray:
    return np.asarray(view.image)


def test_views_same_seed_identical(support_images):
    first = make_training_views(support_images, SIZE, n_views=12, seed=7)
    second = make_training_views(support_images, SIZE, n_views=12, seed=7)

    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(_as_array(a), _as_array(b))
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.label == b.label


def test_views_other_seed_differ(support_images):
    first = make_training_views(support_images, SIZE, n_views=12, seed=7)
    second = make_training_views(support_images, SIZE, n_views=12, seed=8)

    images_equal = [
        np.array_equal(_as_array(a), _as_array(b)) for a, b in zip(first, second, strict=True)
    ]
    assert not all(images_equal)


def test_views_shapes_and_dtypes(support_images):
    views = make_training_views(support_images, SIZE, n_views=10, seed=0)

    assert len(views) == 10
    for view in views:
        assert view.image.mode == "RGB"
        assert view.image.size == (SIZE, SIZE)
        assert view.mask.dtype == np.bool_
        assert view.mask.shape == (SIZE, SIZE)
        assert isinstance(view.label, int)


def test_views_mask_matches_label(support_images):
    views = make_training_views(support_images, SIZE, n_views=40, seed=3, anomaly_fraction=0.5)

    for view in views:
        assert view.label == int(view.mask.any())
    assert {view.label for view in views} == {0, 1}


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_views_anomaly_fraction_respected(support_images, fraction):
    views = make_training_views(support_images, SIZE, n_views=20, seed=5, anomaly_fraction=fraction)

    n_anomalous = sum(view.label for view in views)
    assert n_anomalous == round(20 * fraction)


def test_views_anomalies_change_pixels(support_images):
    config = AugmentConfig(hflip_prob=0.0, vflip_prob=0.0, max_rotation_deg=0.0)
    base = np.asarray(
        support_images[0].convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    )

    views = make_training_views(
        support_images[:1], SIZE, 16, seed=2, anomaly_fraction=1.0, config=config
    )

    changed = [np.any(_as_array(view)[view.mask] != base[view.mask]) for view in views]
    assert sum(changed) >= 14  # a pasted patch may rarely land on near-identical pixels


def test_views_pixels_outside_mask_unchanged(support_images):
    """With flips and rotation off, a view differs from its resized support image only in the mask."""
    config = AugmentConfig(hflip_prob=0.0, vflip_prob=0.0, max_rotation_deg=0.0)
    bases = [
        np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
        for image in support_images
    ]

    views = make_training_views(
        support_images, SIZE, 12, seed=4, anomaly_fraction=0.5, config=config
    )

    for j, view in enumerate(views):
        outside = ~view.mask
        np.testing.assert_array_equal(_as_array(view)[outside], bases[j % len(bases)][outside])


def test_views_cycle_images_in_order(support_images):
    config = AugmentConfig(hflip_prob=0.0, vflip_prob=0.0, max_rotation_deg=0.0)
    views = make_training_views(
        support_images, SIZE, 6, seed=0, anomaly_fraction=0.0, config=config
    )

    for j, view in enumerate(views):
        expected = (
            support_images[j % 3].convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        )
        np.testing.assert_array_equal(_as_array(view), np.asarray(expected))


def test_views_normal_views_are_augmented(support_images):
    base = np.asarray(
        support_images[0].convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    )

    views = make_training_views(support_images[:1], SIZE, 8, seed=1, anomaly_fraction=0.0)

    assert not all(np.array_equal(_as_array(view), base) for view in views)
    for view in views:
        # A flip or a rotation of a few degrees keeps the colour statistics close.
        assert abs(_as_array(view).mean() - base.mean()) < 5.0


def test_views_single_image_support():
    image = _structured_image(30, 30, seed=9)

    views = make_training_views([image], SIZE, n_views=6, seed=0, anomaly_fraction=0.5)

    assert len(views) == 6
    assert sum(view.label for view in views) == 3


def test_views_zero_views_empty(support_images):
    assert make_training_views(support_images, SIZE, n_views=0, seed=0) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": []}, "images is empty"),
        ({"size": 4}, "size must be at least 8"),
        ({"n_views": -1}, "n_views must be non-negative"),
        ({"anomaly_fraction": 1.5}, "anomaly_fraction must lie in"),
    ],
)
def test_views_invalid_arguments_rejected(support_images, kwargs, message):
    arguments = {"images": support_images, "size": SIZE, "n_views": 2, "seed": 0} | kwargs

    with pytest.raises(ValueError, match=message):
        make_training_views(**arguments)


def test_config_invalid_probability_rejected():
    with pytest.raises(ValueError, match="hflip_prob must lie in"):
        AugmentConfig(hflip_prob=1.2)


def test_config_invalid_area_rejected():
    with pytest.raises(ValueError, match="patch_area"):
        AugmentConfig(patch_area=(0.3, 0.1))


def test_cut_paste_changes_only_footprint():
    pixels = np.asarray(_structured_image(SIZE, SIZE, seed=3))
    config = AugmentConfig(patch_rotation_prob=1.0)

    for seed in range(10):
        out, mask = cut_paste(pixels, np.random.default_rng(seed), config)
        assert mask.any()
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out[~mask], pixels[~mask])


def test_cut_paste_unrotated_mask_rectangle():
    pixels = np.asarray(_structured_image(SIZE, SIZE, seed=3))
    config = AugmentConfig(patch_rotation_prob=0.0)

    _, mask = cut_paste(pixels, np.random.default_rng(0), config)

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    assert mask.sum() == len(rows) * len(cols)
    assert rows[-1] - rows[0] + 1 == len(rows)
    assert cols[-1] - cols[0] + 1 == len(cols)


def test_cut_paste_patch_area_in_range():
    pixels = np.asarray(_structured_image(SIZE, SIZE, seed=3))
    config = AugmentConfig(patch_rotation_prob=0.0, patch_area=(0.05, 0.1), patch_aspect=(1.0, 1.0))

    _, mask = cut_paste(pixels, np.random.default_rng(1), config)

    # Rounding the side to whole pixels moves the area by at most about one row and column.
    assert 0.05 * SIZE * SIZE - 2 * SIZE * 0.35 <= mask.sum() <= 0.1 * SIZE * SIZE + 2 * SIZE * 0.35


@pytest.mark.parametrize("texture_prob", [0.0, 1.0])
def test_perlin_blend_changes_only_mask(texture_prob):
    pixels = np.asarray(_structured_image(SIZE, SIZE, seed=4))
    config = AugmentConfig(texture_prob=texture_prob, perlin_area=(0.1, 0.1))

    out, mask = perlin_blend(pixels, np.random.default_rng(0), config)

    np.testing.assert_array_equal(out[~mask], pixels[~mask])
    assert np.any(out[mask] != pixels[mask])
    # The mask keeps the top 10% of the noise field; ties can add a few pixels.
    assert mask.sum() == pytest.approx(0.1 * SIZE * SIZE, abs=3)


def test_perlin_noise_shape_dtype_range():
    noise = perlin_noise((40, 56), (4, 7), np.random.default_rng(0))

    assert noise.shape == (40, 56)
    assert noise.dtype == np.float32
    assert np.all(np.abs(noise) <= np.sqrt(0.5) + 1e-6)
    assert noise.std() > 0.05


def test_perlin_noise_deterministic():
    first = perlin_noise((32, 32), 4, np.random.default_rng(11))
    second = perlin_noise((32, 32), 4, np.random.default_rng(11))

    np.testing.assert_array_equal(first, second)


def test_perlin_noise_smooth_at_low_res():
    """Neighbouring pixels differ far less than the field's spread when cells span many pixels."""
    noise = perlin_noise((64, 64), 2, np.random.default_rng(0))

    step = np.abs(np.diff(noise, axis=1)).max()
    assert step < 0.1 * (noise.max() - noise.min())


def test_perlin_noise_invalid_res_rejected():
    with pytest.raises(ValueError, match="res must be positive"):
        perlin_noise((8, 8), 0, np.random.default_rng(0))


def test_cut_paste_copies_another_region():
    """Without jitter or rotation the pasted patch equals the image at a different place."""
    pixels = np.asarray(_structured_image(SIZE, SIZE, seed=5))
    config = AugmentConfig(brightness_jitter=0.0, patch_rotation_prob=0.0)

    for seed in range(5):
        out, mask = cut_paste(pixels, np.random.default_rng(seed), config)
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        patch = out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        patch_h, patch_w = patch.shape[:2]
        sources = [
            (y, x)
            for y in range(SIZE - patch_h + 1)
            for x in range(SIZE - patch_w + 1)
            if np.array_equal(pixels[y : y + patch_h, x : x + patch_w], patch)
        ]
        assert sources, "the pasted patch matches no region of the original image"
        assert (rows[0], cols[0]) not in sources
