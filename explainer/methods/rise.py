"""DF-RISE: where the model recovers the image at step k (docs/methods.md, DF-RISE; Park, Ju & Lee, 2024).

Random masks hide parts of x_t; each masked latent goes through the guided denoiser, and how close
what the masked input gives comes to the real x_{t-1} scores every latent pixel: minus the local
squared difference by default, or the paper's SSIM *structure* term (``similarity``). The map is, per latent pixel, the mean score over the masks that kept it minus the mean over
the masks that dropped it (``estimator="contrast"``, our default; the paper's ``sum_n M_n * S_n`` is
``estimator="sum"``), then ReLU, min-max. Masks are batched through the denoiser (the public code
runs one mask per forward pass).

Example:
    >>> explanation = DFRise(n_masks=500, mode="next-latent").explain(model, run, step=15)
    >>> explanation.saliency.shape  # (H_lat, W_lat)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import config
from ..replay import guided_prediction, noise_from, step_from, step_inputs
from .base import PerturbationMethod, batches, check_choice, check_int, check_number
from .options import option

MODES = ("next-latent", "paper")
MASK_KINDS = ("pixel", "grid")
ESTIMATORS = ("sum", "mean", "contrast")
SSIM_WINDOW = 15
SSIM_SIGMA = 1.5
SSIM_C3 = 0.03**2 / 2  # (K2 * data range)^2 / 2 with data range 1


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """A (size, size) Gaussian kernel that sums to 1."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    line = line / line.sum()
    return torch.outer(line, line).float()


def local_mean(values: torch.Tensor) -> torch.Tensor:
    """Per-channel local mean of (B, C, h, w) under the 15x15 Gaussian window (sigma 1.5), zero padding."""
    channels = values.shape[1]
    window = gaussian_window().to(values.device).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)
    return F.conv2d(values, window, padding=SSIM_WINDOW // 2, groups=channels)


def structure_term(real: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """SSIM structure term ``(s_xy + C3) / (s_x s_y + C3)`` per pixel, averaged over channels.

    Local statistics come from a 15x15 Gaussian window (sigma 1.5) with zero padding, as the
    public code's SSIM. Written with torch ``conv2d`` rather than scikit-image so that a whole
    batch of masks is scored at once on the model's device.

    Args:
        real: (1 or B, C, h, w); other: (B, C, h, w).
    Returns:
        (B, h, w) float32.
    """
    real, other = torch.broadcast_tensors(real.float(), other.float())
    mean_real, mean_other = local_mean(real), local_mean(other)
    var_real = (local_mean(real * real) - mean_real**2).clamp(min=0)
    var_other = (local_mean(other * other) - mean_other**2).clamp(min=0)
    covariance = local_mean(real * other) - mean_real * mean_other
    structure = (covariance + SSIM_C3) / (var_real.sqrt() * var_other.sqrt() + SSIM_C3)
    return structure.mean(1)


def negative_squared_error(real: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Minus the local mean squared difference, same window, averaged over channels: (B, h, w) float32.
    Unlike the structure term it is not divided by the local contrast, so a flat region does not
    count a small difference as a large one."""
    real, other = torch.broadcast_tensors(real.float(), other.float())
    return -local_mean((real - other) ** 2).mean(1)


# How a masked input's result is scored against the real x_{t-1} at each latent pixel (why the default:
# docs/evaluation.md, "DF-RISE at the last step").
SIMILARITIES = {"squared-error": negative_squared_error, "structure": structure_term}


def squared_error_applies(mode: str, estimator: str) -> bool:
    """Only next-latent mode compares like with like, and only the contrast estimator needs no zero."""
    return (mode, estimator) == ("next-latent", "contrast")


def default_similarity(mode: str, estimator: str) -> str:
    """"squared-error" where it applies (next-latent mode, contrast estimator), else the paper's "structure"."""
    return "squared-error" if squared_error_applies(mode, estimator) else "structure"


def pixel_masks(count: int, size: tuple[int, int], keep: float, generator: torch.Generator) -> torch.Tensor:
    """(count, 1, h, w) masks, each latent pixel kept with probability ``keep``."""
    return (torch.rand(count, 1, *size, generator=generator) < keep).float()


def grid_masks(count: int, size: tuple[int, int], keep: float, grid: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 1, h, w) classic RISE masks: a grid x grid Bernoulli grid, bilinearly upsampled, randomly shifted."""
    height, width = size
    cell_h, cell_w = math.ceil(height / grid), math.ceil(width / grid)
    coarse = (torch.rand(count, 1, grid, grid, generator=generator) < keep).float()
    fine = F.interpolate(coarse, size=((grid + 1) * cell_h, (grid + 1) * cell_w), mode="bilinear", align_corners=False)
    shift_h = torch.randint(0, cell_h, (count,), generator=generator)
    shift_w = torch.randint(0, cell_w, (count,), generator=generator)
    shifts = zip(shift_h.tolist(), shift_w.tolist())
    return torch.stack([fine[n, :, y : y + height, x : x + width] for n, (y, x) in enumerate(shifts)])


@dataclass(kw_only=True)
class DFRise(PerturbationMethod):
    """DF-RISE saliency of one step (docs/methods.md, DF-RISE).

    Args:
        n_masks: number of random masks N (paper: 500).
        keep: probability p that a latent pixel (or grid cell) is kept (paper: 0.5).
        mask: "pixel" (one Bernoulli per latent pixel, shared by the channels) or "grid"
            (classic RISE: ``grid`` x ``grid`` cells, bilinear upsampling, random shift).
        grid: cells per side for ``mask="grid"``.
        mode: "next-latent" (default; our choice): compare the real x_{t-1} with the DDIM step
            taken from the masked prediction at the real x_t, so like is compared with like and
            only the prediction differs; "paper": compare it with the masked noise prediction,
            as the public code does.
        estimator: how the per-mask maps become one map, per latent pixel x:
            "sum": ``sum_n M_n(x) S_n(x)``, the paper's; "mean": the sum divided by the masks'
            weight at x, RISE's E[S(x) | x kept]; "contrast" (default): E[S(x) | x kept] -
            E[S(x) | x dropped], how much keeping x improves the match at x (why: docs/evaluation.md,
            "How DF-RISE combines its masks").
        similarity: how a masked result S_n is scored against the real x_{t-1} at each latent pixel
            (``SIMILARITIES``): "squared-error", minus the local mean squared difference (the
            default in next-latent mode with the contrast estimator, where like is compared with
            like and only differences of scores count), or "structure", the SSIM structure term
            (the paper's; the default otherwise: paper mode's noise prediction can
            only be compared with a latent by a scale-free score, and "sum" and "mean" need a score
            with a zero).
        seed: seed of the mask generator (same seed, same masks, same map).
        batch_size: masks per denoiser forward pass.
    Returns (from ``explain``):
        ``Explanation`` with ``saliency`` (H_lat, W_lat); ``denoiser_calls`` = ceil(N / batch_size).
    """

    n_masks: int = option(500, f"Masks (the paper: 500; at most {config.LIMITS.max_masks})",
                          "More masks give a smoother map and take longer.", bounds=(1, config.LIMITS.max_masks))
    keep: float = option(0.5, "Share each mask keeps", "The share of the picture each random mask leaves in place.",
                         bounds=(0.05, 0.95), step=0.05)
    mask: str = option("pixel", "Masks", "Spot by spot, or in blocks.", choices=MASK_KINDS)
    grid: int = 4
    mode: str = option("next-latent", "How a masked result is scored", "By how far it lands from the real next step "
                       "(next-latent, recommended), or as the paper's code does (paper).", choices=MODES)
    estimator: str = option("contrast", "How the masks add up", "What the kept spots score minus what the hidden ones score "
                            "(contrast, recommended), the kept ones' mean, or the paper's sum.", choices=ESTIMATORS)
    similarity: str | None = None  # None: default_similarity(mode, estimator)
    seed: int = option(0, "Mask seed", "The same seed gives the same masks.")
    name = "df-rise"
    label = "DF-RISE"

    def __post_init__(self) -> None:
        if self.similarity is None:
            self.similarity = default_similarity(self.mode, self.estimator)
        super().__post_init__()

    def _check_options(self) -> None:
        super()._check_options()
        check_int("n_masks", self.n_masks, 1, config.LIMITS.max_masks)
        check_number("keep", self.keep, 0.0, 1.0, open_low=True)
        check_choice("mask", self.mask, MASK_KINDS)
        check_int("grid", self.grid, 1, config.LIMITS.max_rise_grid)
        check_choice("mode", self.mode, MODES)
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_choice("similarity", self.similarity, tuple(SIMILARITIES))
        if self.similarity == "squared-error" and not squared_error_applies(self.mode, self.estimator):
            raise ValueError("similarity='squared-error' needs mode='next-latent' and estimator='contrast': paper mode compares "
                             "x_{t-1} with a noise prediction, which only the scale-free 'structure' can, and a squared error "
                             "has no zero that 'sum' or 'mean' could count from (after the ReLU their maps are empty).")
        check_int("seed", self.seed, 0, config.LIMITS.max_seed)

    def masks(self, size: tuple[int, int]) -> torch.Tensor:
        """The N masks (N, 1, h, w) this method uses on a latent grid of ``size``, from its seed."""
        generator = torch.Generator().manual_seed(self.seed)
        if self.mask == "grid":
            return grid_masks(self.n_masks, size, self.keep, self.grid, generator)
        return pixel_masks(self.n_masks, size, self.keep, generator)

    def scores(self, model, inputs, masks: torch.Tensor) -> torch.Tensor:
        """Per-mask score maps S_n (B, h, w) for a batch of masks (B, 1, h, w)."""
        masks = masks.to(inputs.latents.device, inputs.latents.dtype)
        masked = masks * inputs.latents  # (B, C, h, w): one mask shared by the channels
        with torch.no_grad():
            prediction = guided_prediction(model, inputs, masked)
            if self.mode == "paper":  # the noise prediction (a v- or x0-model's output converted to it)
                compared = noise_from(model, inputs, masked, prediction)
            else:
                compared = step_from(model, inputs, inputs.latents.expand_as(masked), prediction)
            return SIMILARITIES[self.similarity](inputs.next_latents, compared)

    def combine(self, kept_sum: torch.Tensor, all_sum: torch.Tensor, kept_weight: torch.Tensor) -> torch.Tensor:
        """One map (h, w) from ``sum_n M_n S_n``, ``sum_n S_n`` and ``sum_n M_n``, by ``estimator``."""
        if self.estimator == "sum":
            return kept_sum
        kept_mean = kept_sum / kept_weight.clamp(min=1e-6)
        if self.estimator == "mean":
            return kept_mean
        dropped_weight = (self.n_masks - kept_weight).clamp(min=1e-6)
        return kept_mean - (all_sum - kept_sum) / dropped_weight

    def _explain(self, model, run, step):
        inputs = step_inputs(model, run, step)
        masks = self.masks(tuple(inputs.latents.shape[-2:]))
        kept_sum = torch.zeros(inputs.latents.shape[-2:], dtype=torch.float32, device=inputs.latents.device)
        all_sum = torch.zeros_like(kept_sum)
        chunks = batches(self.n_masks, self.batch_size)
        for start, stop in chunks:
            batch = masks[start:stop]
            scores = self.scores(model, inputs, batch)  # (B, h, w)
            kept_sum += (batch[:, 0].to(scores.device) * scores).sum(0)
            all_sum += scores.sum(0)
        saliency = self.combine(kept_sum, all_sum, masks[:, 0].sum(0).to(kept_sum.device))
        saliency = saliency.clamp(min=0).cpu().numpy()
        return self._result(run, step, saliency, denoiser_calls=len(chunks))
