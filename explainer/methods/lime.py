"""DF-LIME: the paper's LIME baseline on one denoising step (SPEC §6).

Superpixels come from scikit-image's quickshift on the decoded x_{t-1} shrunk to the latent grid;
random on/off vectors switch segments of x_t off (set to 0); each perturbed latent goes through
the guided denoiser and the DDIM step, and the channel mean of that predicted x_{t-1} is the
model's output. A weighted ridge regression (scikit-learn) of the outputs on the on/off vectors
gives each segment a weight, and the map paints each segment with its weight.

Example:
    >>> explanation = DFLime(n_samples=1000).explain(model, run, step=15)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.segmentation import quickshift
from skimage.transform import resize
from sklearn.linear_model import Ridge
from sklearn.metrics import pairwise_distances

from ..images import decode
from .base import PerturbationMethod, batches, check_int, check_number, ddim_step, guided_prediction, step_inputs


def superpixels(
    model, next_latents: torch.Tensor, kernel_size: float = 4, max_dist: float = 200, ratio: float = 0.2, seed: int = 0
) -> np.ndarray:
    """Quickshift segments (h, w) of the decoded x_{t-1} resized to the latent grid; labels 0..S-1.

    With the paper's parameters a small latent grid gives few segments (one on an 8x8 grid).
    """
    size = tuple(next_latents.shape[-2:])
    picture = decode(model.pipe, next_latents, output_type="np")[0]  # (H, W, 3) in [0, 1]
    small = resize(picture, size, anti_aliasing=True).astype(np.float64)  # (h, w, 3)
    segments = quickshift(small, kernel_size=kernel_size, max_dist=max_dist, ratio=ratio, rng=seed)
    _, labels = np.unique(segments, return_inverse=True)
    return labels.reshape(size)


@dataclass(kw_only=True)
class DFLime(PerturbationMethod):
    """DF-LIME saliency of one step (SPEC §6).

    Args:
        n_samples: random on/off vectors (paper: 1000); the first one is all on, as in LIME.
        kernel_width: w of the proximity kernel ``exp(-d^2 / w^2)`` on the cosine distance d
            between an on/off vector and the all-on vector (paper: 0.25).
        ridge_alpha: regularisation of the ridge regression (LIME's default, 1.0).
        kernel_size, max_dist, ratio: quickshift's parameters (paper: 4, 200, 0.2).
        seed: seed of the on/off vectors and of quickshift.
        batch_size: perturbed latents per denoiser forward pass.
    Returns (from ``explain``):
        ``Explanation`` with ``saliency`` (H_lat, W_lat): each segment painted with its weight
        (the ridge weights for the h*w outputs, averaged over the outputs: our choice, equal to
        the weight for the mean output), min-max.
    """

    n_samples: int = 1000
    kernel_width: float = 0.25
    ridge_alpha: float = 1.0
    kernel_size: float = 4
    max_dist: float = 200
    ratio: float = 0.2
    seed: int = 0
    name = "df-lime"

    def _check_options(self) -> None:
        super()._check_options()
        check_int("n_samples", self.n_samples, 2, 100_000)
        check_number("kernel_width", self.kernel_width, 0.0, 100.0, open_low=True)
        check_number("ridge_alpha", self.ridge_alpha, 0.0, 1e6)
        check_number("kernel_size", self.kernel_size, 0.0, 100.0, open_low=True)
        check_number("max_dist", self.max_dist, 0.0, 1e6, open_low=True)
        check_number("ratio", self.ratio, 0.0, 1.0)
        check_int("seed", self.seed, 0, 2**32 - 1)

    def perturbations(self, segment_count: int) -> np.ndarray:
        """(n_samples, S) on/off vectors from the seed; the first is all on."""
        vectors = np.random.default_rng(self.seed).integers(0, 2, size=(self.n_samples, segment_count))
        vectors[0] = 1
        return vectors

    def outputs(self, model, inputs, segments: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """(n_samples, h * w): channel mean of the predicted x_{t-1} for every perturbation."""
        segment_map = torch.from_numpy(segments).to(inputs.latents.device)
        results = []
        for start, stop in batches(len(vectors), self.batch_size):
            on = torch.from_numpy(vectors[start:stop]).to(inputs.latents.device, inputs.latents.dtype)
            masks = on[:, segment_map][:, None]  # (B, 1, h, w): each pixel takes its segment's switch
            perturbed = masks * inputs.latents
            with torch.no_grad():
                prediction = guided_prediction(model, inputs, perturbed)
                predicted_next = ddim_step(inputs, perturbed, prediction)  # the step from the perturbed latent
            results.append(predicted_next.float().mean(1).flatten(1).cpu().numpy())
        return np.concatenate(results)

    def _explain(self, model, run, step):
        inputs = step_inputs(model, run, step)
        segments = superpixels(model, inputs.next_latents, self.kernel_size, self.max_dist, self.ratio, self.seed)
        vectors = self.perturbations(int(segments.max()) + 1)
        outputs = self.outputs(model, inputs, segments, vectors)
        distances = pairwise_distances(vectors, vectors[:1], metric="cosine").ravel()
        proximity = np.exp(-(distances**2) / self.kernel_width**2)
        regression = Ridge(alpha=self.ridge_alpha, fit_intercept=True).fit(vectors, outputs, sample_weight=proximity)
        weights = regression.coef_.mean(0)  # (h * w, S) -> (S,)
        return self._result(run, step, weights[segments], denoiser_calls=len(batches(len(vectors), self.batch_size)))
