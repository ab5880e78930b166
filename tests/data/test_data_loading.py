"""Loading rules: image modes, 16-bit scaling, mask encodings, nearest-neighbour resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from h2vlr.data import load_image, load_mask, resize_mask


def _rgb_pattern() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)


def _image_in_mode(mode: str) -> Image.Image:
    rgb = Image.fromarray(_rgb_pattern())
    if mode == "I;16":
        values = np.linspace(0, 65535, 60, dtype=np.uint16).reshape(6, 10)
        return Image.fromarray(values)
    if mode == "I":
        return Image.fromarray(np.full((6, 10), 70000, dtype=np.int32))
    if mode == "P":
        return rgb.quantize(colors=16)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
def test_load_image_any_mode_gives_8bit_rgb(tmp_path: Path, mode: str) -> None:
    image = _image_in_mode(mode)
    suffix = ".tiff" if mode in ("I", "F", "CMYK") else ".png"
    path = tmp_path / f"image{suffix}"
    image.save(path)

    loaded = load_image(path)

    assert loaded.mode == "RGB"
    assert loaded.size == (10, 6)
    assert np.asarray(loaded).dtype == np.uint8


def test_load_image_rgb_pixels_unchanged(tmp_path: Path) -> None:
    pattern = _rgb_pattern()
    Image.fromarray(pattern).save(tmp_path / "rgb.png")

    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "rgb.png")), pattern)


def test_load_image_drops_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent; colour must survive anyway
    Image.fromarray(rgba).save(tmp_path / "rgba.png")

    pixels = np.asarray(load_image(tmp_path / "rgba.png"))

    assert (pixels[..., 0] == 200).all()
    assert (pixels[..., 1:] == 0).all()


def test_load_image_16bit_constant_scaled(tmp_path: Path) -> None:
    values = np.full((5, 5), 1000, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "c.png")

    pixels = np.asarray(load_image(tmp_path / "c.png"))

    # 1000 * 255 / 65535 = 3.89, so about 4, not clipped to 255.
    assert (pixels == 4).all()


def test_load_image_16bit_ramp_monotonic(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(1, 256)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")

    row = np.asarray(load_image(tmp_path / "ramp.png"))[0, :, 0].astype(int)

    assert row[0] == 0
    assert row[-1] == 255
    assert (np.diff(row) >= 0).all()
    assert len(np.unique(row)) > 200  # scaled across the range, not saturated


def test_load_image_32bit_mode_i_scaled_as_16bit(tmp_path: Path) -> None:
    values = np.full((3, 3), 1000, dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "i.tiff")

    assert (np.asarray(load_image(tmp_path / "i.tiff")) == 4).all()


def test_load_image_unreadable_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image")

    with pytest.raises(ValueError, match="broken.png"):
        load_image(path)


@pytest.mark.parametrize("value", [1, 3, 240, 255])
def test_load_mask_nonzero_is_anomalous(tmp_path: Path, value: int) -> None:
    reference = np.zeros((8, 8), dtype=bool)
    reference[2:6, 3:5] = True
    Image.fromarray(reference.astype(np.uint8) * value).save(tmp_path / "m.png")

    mask = load_mask(tmp_path / "m.png")

    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, reference)


def test_load_mask_rgb_and_palette(tmp_path: Path) -> None:
    reference = np.zeros((8, 8), dtype=bool)
    reference[0:3, 0:3] = True
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[reference] = (0, 0, 7)  # non-zero in one channel only
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(reference.astype(np.uint8)).convert("P").save(tmp_path / "p.png")

    np.testing.assert_array_equal(load_mask(tmp_path / "rgb.png"), reference)
    np.testing.assert_array_equal(load_mask(tmp_path / "p.png"), reference)


@pytest.mark.parametrize("offset", [96, 101])
def test_resize_mask_square_exact_count(offset: int) -> None:
    mask = np.zeros((256, 256), dtype=bool)
    mask[offset : offset + 64, offset : offset + 64] = True

    resized = resize_mask(mask, 224)

    assert resized.shape == (224, 224)
    assert resized.dtype == bool
    # 64 * 224 / 256 = 56 rows and columns: 3136 pixels, exactly.
    assert int(resized.sum()) == 3136


def test_resize_mask_rectangular_size() -> None:
    mask = np.zeros((10, 20), dtype=bool)
    mask[:, :10] = True

    resized = resize_mask(mask, (5, 40))

    assert resized.shape == (5, 40)
    assert resized[:, :20].all()
    assert not resized[:, 20:].any()


def test_resize_mask_rejects_3d() -> None:
    with pytest.raises(ValueError, match="shape"):
        resize_mask(np.zeros((4, 4, 3), dtype=bool), 2)
