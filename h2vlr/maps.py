"""Turning patch-grid scores into anomaly maps at the evaluation resolution."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Return a normalised 1-D Gaussian kernel of radius ``ceil(4 * sigma)`` pixels."""
    radius = max(1, math.ceil(4.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Smooth ``[B, H, W]`` maps with a separable Gaussian; ``sigma <= 0`` returns them unchanged.

    Borders use reflection padding, so a constant map stays constant.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)  # [B, 1, H, W]
    pad_mode = "reflect" if min(maps.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=pad_mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode=pad_mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def patch_scores_to_maps(
    patch_scores: torch.Tensor, grid_size: tuple[int, int], size: int, sigma: float = 4.0
) -> torch.Tensor:
    """Upsample per-patch scores bilinearly to ``size x size`` and smooth them.

    Args:
        patch_scores: ``[B, N]`` scores, patches in row-major grid order.
        grid_size: ``(gh, gw)`` with ``gh * gw == N``.
        size: evaluation resolution ``S`` in pixels.
        sigma: Gaussian standard deviation in pixels at resolution ``S``.

    Returns:
        ``[B, S, S]`` float32 maps.
    """
    gh, gw = grid_size
    if patch_scores.shape[-1] != gh * gw:
        raise ValueError(
            f"patch_scores has {patch_scores.shape[-1]} patches but grid {gh}x{gw} "
            f"needs {gh * gw}"
        )
    grid = patch_scores.float().reshape(-1, 1, gh, gw)
    maps = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    return gaussian_blur(maps.squeeze(1), sigma)
