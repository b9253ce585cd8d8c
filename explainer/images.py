"""Latents to pictures: the fast linear preview and the real VAE decode (docs/methods.md, Terms)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def fit_latent_rgb(vae, samples: int = 8, grid: int = 8, seed: int = 0) -> np.ndarray:
    """Fit a (channels + 1) x 3 linear map from latent channels (plus a bias) to RGB.

    Decodes random unit-variance latents (the UNet's scale) at a small size with the VAE,
    averages each decoded patch down to its latent pixel and solves least squares. Good enough for a live preview of any
    AutoencoderKL; known models carry fixed factors in the config instead.
    """
    generator = torch.Generator().manual_seed(seed)
    channels = vae.config.latent_channels
    latents = torch.randn(samples, channels, grid, grid, generator=generator)
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    with torch.inference_mode():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample.float().clamp(-1, 1)  # (S, 3, grid * f, grid * f)
    pooled = torch.nn.functional.adaptive_avg_pool2d(decoded, grid)  # (S, 3, grid, grid)
    inputs = latents.float().permute(0, 2, 3, 1).reshape(-1, channels).cpu().numpy()
    inputs = np.concatenate([inputs, np.ones((len(inputs), 1), np.float32)], axis=1)
    targets = pooled.permute(0, 2, 3, 1).reshape(-1, 3).cpu().numpy()
    factors, *_ = np.linalg.lstsq(inputs, targets, rcond=None)
    return factors.astype(np.float32)


def preview(latents: torch.Tensor, factors: np.ndarray) -> Image.Image:
    """Fast RGB preview of one latent (1, C, h, w), in the UNet's scale, at the latent's own size (w x h).

    ``factors`` is C x 3, or (C + 1) x 3 with a bias row. Kept small: enlarging adds no information.
    """
    latent = latents[0].float().cpu().numpy()  # (C, h, w)
    channels = latent.shape[0]
    rgb = np.einsum("chw,cd->hwd", latent, factors[:channels])
    if len(factors) > channels:
        rgb = rgb + factors[channels]
    pixels = ((rgb.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)
    return Image.fromarray(pixels)


def decode(pipe, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image] | np.ndarray:
    """VAE-decode latents (B, C, h, w) in the UNet's scale, as the pipeline does.

    Returns PIL images, or with ``output_type="np"`` a float array (B, H, W, 3) in [0, 1].
    """
    vae = pipe.vae
    with torch.inference_mode():
        images = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images.float(), output_type=output_type, do_denormalize=[True] * len(images))


def decode_in_batches(pipe, latents: list[torch.Tensor], batch_size: int = 8) -> list[Image.Image]:
    """VAE-decode many latents (each (1, C, h, w), the UNet's scale) into pictures, ``batch_size`` at
    a time so that memory stays bounded at Stable Diffusion's size."""
    pictures: list[Image.Image] = []
    for start in range(0, len(latents), batch_size):
        pictures += decode(pipe, torch.cat(latents[start : start + batch_size]))
    return pictures
