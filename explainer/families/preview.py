"""The fast preview's latent-to-RGB map, fitted to a family's VAE (what every family's ``fit_preview`` does)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def fit_linear_preview(vae, decoder_input: Callable[[torch.Tensor], torch.Tensor], samples: int = 8, grid: int = 8,
                       seed: int = 0) -> np.ndarray:
    """Least squares from latent channels (plus a bias) to RGB: (C + 1) x 3, float32. Random
    unit-variance latents in the denoiser's scale are decoded at a small size (``decoder_input`` takes
    them to what the VAE's decoder reads: the family's scale and shift), and each decoded patch is
    averaged down to its latent pixel."""
    generator = torch.Generator().manual_seed(seed)
    channels = vae.config.latent_channels
    latents = torch.randn(samples, channels, grid, grid, generator=generator).to(device=vae.device, dtype=vae.dtype)
    with torch.inference_mode():
        decoded = vae.decode(decoder_input(latents)).sample.float().clamp(-1, 1)  # (S, 3, grid * f, grid * f)
    pooled = torch.nn.functional.adaptive_avg_pool2d(decoded, grid)  # (S, 3, grid, grid)
    inputs = latents.float().permute(0, 2, 3, 1).reshape(-1, channels).cpu().numpy()
    inputs = np.concatenate([inputs, np.ones((len(inputs), 1), np.float32)], axis=1)
    targets = pooled.permute(0, 2, 3, 1).reshape(-1, 3).cpu().numpy()
    factors, *_ = np.linalg.lstsq(inputs, targets, rcond=None)
    return factors.astype(np.float32)
