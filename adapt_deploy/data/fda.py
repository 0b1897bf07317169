"""Fourier Domain Adaptation (FDA; Yang & Soatto, CVPR 2020): pixel-level alignment without a
GAN. A source image takes the low-frequency amplitude spectrum of a target image and keeps its
own phase, so it takes on the target's global tone and lighting while its content, and so its
labels, stay where they are.

The window follows the paper's code: in the centred (fftshift) spectrum of an H x W image, the
square of half-width b = floor(beta * min(H, W)) around the zero frequency, side 2b + 1 (beta > 0
always swaps at least the mean colour). The window is symmetric in frequency, so the mixed
spectrum stays Hermitian and its inverse transform is real.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIMS = (-2, -1)


def window_half_width(height: int, width: int, beta: float) -> int:
    """b = floor(beta * min(H, W)): the low-frequency window spans frequencies -b..b."""
    return math.floor(beta * min(height, width))


def swap_low_frequencies(source: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Float images (..., H, W) of equal shape: `source` with the amplitude of `target` inside
    the low-frequency window and its own phase everywhere; not clipped. beta 0: `source`."""
    if beta <= 0:
        return source
    if source.shape != target.shape:
        raise ValueError(
            f"FDA needs equal shapes, got {tuple(source.shape)} and {tuple(target.shape)}"
        )
    height, width = source.shape[-2:]
    b = window_half_width(height, width, beta)
    spectrum = torch.fft.fftshift(torch.fft.fft2(source), dim=DIMS)
    target_amplitude = torch.fft.fftshift(torch.fft.fft2(target), dim=DIMS).abs()
    amplitude, phase = spectrum.abs(), spectrum.angle()
    rows = slice(height // 2 - b, height // 2 + b + 1)
    cols = slice(width // 2 - b, width // 2 + b + 1)
    amplitude[..., rows, cols] = target_amplitude[..., rows, cols]
    mixed = torch.fft.ifftshift(torch.polar(amplitude, phase), dim=DIMS)
    return torch.fft.ifft2(mixed).real


def fda(source: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """uint8 RGB batches (N, 3, H, W) and (N, 3, h, w): the sources in the style of the targets
    (each target resized bilinearly to its source's size first), clipped to 0-255 and rounded
    back to uint8, the batches' pixel type. beta 0 returns `source` itself."""
    if beta <= 0:
        return source
    height, width = source.shape[-2:]
    style = target.float()
    if style.shape[-2:] != (height, width):
        style = F.interpolate(style, size=(height, width), mode="bilinear", align_corners=False)
    mixed = swap_low_frequencies(source.float(), style, beta)
    return mixed.clamp(0, 255).round().to(torch.uint8)
