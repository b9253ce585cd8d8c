"""Latents to pictures: the fast linear preview and the family's real decode (docs/methods.md, Terms)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def preview(latents: torch.Tensor, factors: np.ndarray) -> Image.Image:
    """Fast RGB preview of one latent (1, C, h, w), in the denoiser's scale, at the latent's own size (w x h).

    ``factors`` is C x 3, or (C + 1) x 3 with a bias row. Kept small: enlarging adds no information.
    """
    latent = latents[0].float().cpu().numpy()  # (C, h, w)
    channels = latent.shape[0]
    rgb = np.einsum("chw,cd->hwd", latent, factors[:channels])
    if len(factors) > channels:
        rgb = rgb + factors[channels]
    pixels = ((rgb.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)
    return Image.fromarray(pixels)


def decode(model, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image] | np.ndarray:
    """Decode latents (B, C, h, w) in the denoiser's scale, as the model's pipeline does.

    Returns PIL images, or with ``output_type="np"`` a float array (B, H, W, 3) in [0, 1].
    """
    return model.family.decode(model.pipe, latents, output_type)


def decode_in_batches(model, latents: list[torch.Tensor], batch_size: int = 8) -> list[Image.Image]:
    """Decode many latents (each (1, C, h, w)) into pictures, ``batch_size`` at a time so that
    memory stays bounded at Stable Diffusion's size."""
    pictures: list[Image.Image] = []
    for start in range(0, len(latents), batch_size):
        pictures += decode(model, torch.cat(latents[start : start + batch_size]))
    return pictures
