"""Tests of the frozen open_clip backbone on the tiny random-init config."""

from __future__ import annotations

import hashlib
import inspect
import logging

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from h2vlr.backbone import (
    PREPROCESS_VERSION,
    WeightsNotAvailableError,
    default_layers,
    load_backbone,
    resolve_device,
    resolve_weights,
)


def _manual_patch_tokens(backbone, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """Run the visual blocks one by one and project the tokens after block ``layer``."""
    visual = backbone.model.visual
    with torch.no_grad():
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # [B, N, width]
        cls = visual.class_embedding.expand(x.shape[0], 1, -1)
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
        for block in visual.transformer.resblocks[:layer]:
            x = block(x)
        return visual.ln_post(x[:, 1:]) @ visual.proj  # [B, N, D]


@pytest.mark.parametrize("image_size", [64, 96])
def test_patch_token_shapes(image_size):
    backbone = load_backbone("tiny-test", "none", device="cpu", image_size=image_size)
    grid = image_size // 8

    global_embeds, patch_tokens = backbone.encode_images(torch.randn(3, 3, image_size, image_size))

    assert backbone.grid_size == (grid, grid)
    assert backbone.identity.image_size == image_size
    assert global_embeds.shape == (3, 32)
    assert patch_tokens.shape == (3, 4, grid * grid, 32)
    assert patch_tokens.dtype == torch.float32


def test_patch_tokens_match_manual_blocks(tiny_backbone):
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    global_embeds, patch_tokens = tiny_backbone.encode_images(pixels)

    for position, layer in enumerate(tiny_backbone.layers):
        expected = _manual_patch_tokens(tiny_backbone, pixels, layer)
        torch.testing.assert_close(patch_tokens[:, position], expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(global_embeds, tiny_backbone.model.encode_image(pixels))


def test_selected_layers_are_used():
    backbone = load_backbone("tiny-test", "none", device="cpu", layers=[2, 4])
    pixels = torch.randn(1, 3, 64, 64)

    _, patch_tokens = backbone.encode_images(pixels)

    assert backbone.identity.layers == (2, 4)
    assert patch_tokens.shape == (1, 2, 64, 32)
    torch.testing.assert_close(
        patch_tokens[:, 0], _manual_patch_tokens(backbone, pixels, 2), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    ("num_blocks", "expected"),
    [
        (12, (3, 6, 9, 12)),
        (24, (6, 12, 18, 24)),
        (4, (1, 2, 3, 4)),
        (10, (2, 5, 7, 10)),
        (2, (1, 2)),
    ],
)
def test_default_layers(num_blocks, expected):
    assert default_layers(num_blocks) == expected


def test_tiny_backbone_identity(tiny_backbone):
    identity = tiny_backbone.identity

    assert identity.model_name == "tiny-test"
    assert identity.weights == "none"
    assert identity.image_size == 64
    assert identity.layers == (1, 2, 3, 4)
    assert identity.preprocess_version == PREPROCESS_VERSION
    assert tiny_backbone.embed_dim == 32
    assert tiny_backbone.text_width == 32


def test_random_weights_log_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="h2vlr.backbone"):
        load_backbone("tiny-test", "none", device="cpu")

    messages = [r.getMessage() for r in caplog.records if r.name == "h2vlr.backbone"]
    assert any("not meaningful" in m for m in messages)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"layers": [0, 2]}, "invalid layers"),
        ({"layers": [5]}, "invalid layers"),
        ({"layers": [3, 2]}, "strictly increasing"),
        ({"image_size": 60}, "multiple of the patch size 8"),
    ],
)
def test_invalid_arguments_raise(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_backbone("tiny-test", "none", device="cpu", **kwargs)


def test_unknown_model_lists_close_names():
    with pytest.raises(ValueError, match="ViT-B-16-plus-240"):
        resolve_weights("ViT-B-16-plus-24", "none")


def test_unknown_tag_lists_valid_tags():
    with pytest.raises(ValueError, match="laion400m_e31, laion400m_e32"):
        resolve_weights("ViT-B-16-plus-240", "laion400m_e99")


def test_invalid_device_raises():
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_gpu_raises():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize(
    ("model", "tag"), [("ViT-B-16-plus-240", "laion400m_e32"), ("ViT-L-14-336", "openai")]
)
def test_uncached_weights_raise_offline(monkeypatch, tmp_path, model, tag):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache/clip, the url download cache

    with pytest.raises(WeightsNotAvailableError) as excinfo:
        resolve_weights(model, tag)

    message = str(excinfo.value)
    assert model in message
    assert tag in message
    assert "--pretrained /path/to/weights.bin" in message
    assert "machine with network access" in message


def test_cached_url_weights_resolve_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    url = open_clip.get_pretrained_url("ViT-B-16-plus-240", "laion400m_e32")
    cached = tmp_path / ".cache" / "clip" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"placeholder; resolve_weights does not read it")

    assert resolve_weights("ViT-B-16-plus-240", "laion400m_e32") == "laion400m_e32"


def test_checkpoint_path_identity_has_sha256(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"not a real checkpoint")
    digest = hashlib.sha256(b"not a real checkpoint").hexdigest()

    assert resolve_weights("tiny-test", str(path)) == f"file:{path.resolve()}@sha256:{digest}"
    assert resolve_weights("tiny-test", "none") == "none"


def test_checkpoint_path_gives_same_features(tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local checkpoint needs no network
    path = tmp_path / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    token_ids = tiny_backbone.tokenize(["a photo of a scratched tile"])

    loaded = load_backbone("tiny-test", str(path), device="cpu")

    assert loaded.identity.weights.startswith(f"file:{path.resolve()}@sha256:")
    for expected, actual in zip(
        tiny_backbone.encode_images(pixels), loaded.encode_images(pixels), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        loaded.encode_text(token_ids), tiny_backbone.encode_text(token_ids), rtol=0, atol=0
    )


def test_backbone_parameters_frozen(tiny_backbone):
    parameters = list(tiny_backbone.model.parameters())

    assert parameters
    assert not any(p.requires_grad for p in parameters)
    assert not tiny_backbone.model.training


def _prompt_with_context(backbone, context: torch.Tensor, text: str) -> tuple[torch.Tensor, ...]:
    """Replace the ``X`` placeholder words after the start token with context vectors."""
    placeholders = " ".join(["X"] * context.shape[0])
    token_ids = backbone.tokenize([f"{placeholders} {text}"])
    embeddings = backbone.token_embeddings(token_ids)  # [1, C, W]
    count = context.shape[0]
    inserted = torch.cat([embeddings[:, :1], context[None], embeddings[:, 1 + count :]], dim=1)
    return inserted, token_ids


def test_gradients_reach_context_only(tiny_backbone):
    context = torch.nn.Parameter(0.02 * torch.randn(4, tiny_backbone.text_width))
    embeddings, token_ids = _prompt_with_context(tiny_backbone, context, "damaged tile.")

    text_embeds = tiny_backbone.encode_text_embeddings(embeddings, token_ids)
    text_embeds.pow(2).sum().backward()

    assert text_embeds.shape == (1, 32)
    assert context.grad is not None
    assert context.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.model.parameters())


def test_context_changes_text_embedding(tiny_backbone):
    plain_ids = tiny_backbone.tokenize(["damaged tile."])
    context = torch.nn.Parameter(torch.randn(4, tiny_backbone.text_width))
    embeddings, token_ids = _prompt_with_context(tiny_backbone, context, "damaged tile.")

    plain = tiny_backbone.encode_text(plain_ids)
    with_context = tiny_backbone.encode_text_embeddings(embeddings, token_ids).detach()

    assert not torch.allclose(plain, with_context, atol=1e-3)


def test_text_embeddings_path_matches_encode_text(tiny_backbone):
    token_ids = tiny_backbone.tokenize(["a photo of a flawless tile", "a cracked tile"])

    from_ids = tiny_backbone.encode_text(token_ids)
    from_embeddings = tiny_backbone.encode_text_embeddings(
        tiny_backbone.token_embeddings(token_ids), token_ids
    )

    assert from_ids.shape == (2, 32)
    torch.testing.assert_close(from_embeddings, from_ids, rtol=1e-5, atol=1e-6)


def test_preprocess_image_normalises_constant_image(tiny_backbone):
    image = Image.new("RGB", (40, 30), color=(255, 0, 128))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    colour = torch.tensor([255.0, 0.0, 128.0]).view(3, 1, 1) / 255.0

    pixels = tiny_backbone.preprocess_image(image)

    assert pixels.shape == (3, 64, 64)
    torch.testing.assert_close(pixels, ((colour - mean) / std).expand(3, 64, 64))


def test_preprocess_mask_nearest_keeps_regions(tiny_backbone):
    mask = np.zeros((128, 256), dtype=bool)
    mask[:64, 128:] = True  # top-right quarter

    resized = tiny_backbone.preprocess_mask(mask)

    expected = np.zeros((64, 64), dtype=bool)
    expected[:32, 32:] = True
    assert resized.dtype == bool
    np.testing.assert_array_equal(resized, expected)


def test_preprocess_mask_square_exact_at_224():
    backbone = load_backbone("tiny-test", "none", device="cpu", image_size=224)
    mask = np.zeros((256, 256), dtype=bool)
    mask[96:160, 96:160] = True

    resized = backbone.preprocess_mask(mask)

    # 64 * 224 / 256 = 56 rows and columns, from row 96 * 224 / 256 = 84 to 140. Nearest
    # neighbour keeps this count exact, where interpolating and thresholding would not.
    assert resized.shape == (224, 224)
    assert int(resized.sum()) == 3136
    assert resized[84:140, 84:140].all()


def test_preprocess_image_and_mask_aligned(tiny_backbone):
    mask = np.zeros((120, 200), dtype=bool)
    mask[30:90, 100:150] = True
    pixels = np.zeros((120, 200, 3), dtype=np.uint8)
    pixels[mask] = 255
    image = Image.fromarray(pixels)

    resized_mask = tiny_backbone.preprocess_mask(mask)
    resized_image = tiny_backbone.preprocess_image(image)

    # Channel 0 after normalisation: white is far above the mean, black far below.
    bright = (resized_image[0] > 0).numpy()
    assert resized_mask.sum() > 0
    assert (bright == resized_mask).mean() > 0.97
    assert bright[resized_mask].all()


def test_preprocess_mask_rejects_3d(tiny_backbone):
    with pytest.raises(ValueError, match=r"expected \[H, W\]"):
        tiny_backbone.preprocess_mask(np.zeros((4, 4, 3), dtype=bool))


@pytest.mark.slow
def test_vit_l_14_336_shapes():
    backbone = load_backbone("ViT-L-14-336", "none", device="cpu")

    global_embeds, patch_tokens = backbone.encode_images(torch.randn(1, 3, 336, 336))

    assert backbone.identity.layers == (6, 12, 18, 24)
    assert backbone.grid_size == (24, 24)
    assert global_embeds.shape == (1, 768)
    assert patch_tokens.shape == (1, 4, 576, 768)


@pytest.mark.slow
def test_default_backbone_shapes():
    backbone = load_backbone(pretrained="none", device="cpu")

    global_embeds, patch_tokens = backbone.encode_images(torch.randn(1, 3, 240, 240))

    assert backbone.identity.model_name == "ViT-B-16-plus-240"
    assert backbone.identity.layers == (3, 6, 9, 12)
    assert backbone.grid_size == (15, 15)
    assert global_embeds.shape == (1, 640)
    assert patch_tokens.shape == (1, 4, 225, 640)


def test_default_weights_are_laion400m():
    defaults = inspect.signature(load_backbone).parameters

    assert defaults["name"].default == "ViT-B-16-plus-240"
    assert defaults["pretrained"].default == "laion400m_e32"
    assert defaults["device"].default == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback without CUDA")
def test_auto_device_without_gpu_is_cpu():
    assert resolve_device("auto") == torch.device("cpu")


def test_random_init_same_in_every_process():
    # The feature cache keys random-init features by the weights string "none" alone,
    # so two loads, even after other random draws, must build identical weights.
    first = load_backbone("tiny-test", "none", device="cpu")
    torch.rand(1000)
    second = load_backbone("tiny-test", "none", device="cpu")
    for (name, a), (_, b) in zip(
        first.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"parameter {name} differs")
