"""DF-LIME: the paper's LIME baseline on one denoising step (docs/methods.md, DF-LIME).

Superpixels come from the decoded x_{t-1} shrunk to the latent grid: scikit-image's quickshift with
the paper's parameters where it finds segments there, SLIC where it does not (``segmentation``);
random on/off vectors switch segments of x_t off (set to 0); each perturbed latent goes through
the guided denoiser, and a number per perturbation is the model's output (``output``): by default
how close the DDIM step from the real x_t with the perturbed latent's prediction comes to the real
x_{t-1}, in the paper the channel mean of the x_{t-1} stepped from the perturbed latent. A weighted
ridge regression (scikit-learn) of the outputs on the on/off vectors gives each segment a weight,
and the map paints each segment with its weight. Why a second segmenter and another output:
docs/evaluation.md, "DF-LIME on a small latent grid".

Example:
    >>> explanation = DFLime(n_samples=1000).explain(model, run, step=15)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.segmentation import quickshift, slic
from skimage.transform import resize
from sklearn.linear_model import Ridge
from sklearn.metrics import pairwise_distances

from ..config import LIMITS
from ..replay import guided_prediction, step_from, step_inputs
from .base import PerturbationMethod, batches, check_choice, check_int, check_number
from .options import option

# "quickshift": the paper's; "slic": SLIC superpixels; "auto": quickshift where it finds at
# least MIN_SEGMENTS segments, else SLIC.
SEGMENTATIONS = ("auto", "quickshift", "slic")
MIN_SEGMENTS = 2  # fewer leave LIME nothing to weigh: refused rather than painted as a flat map
# "step-error": minus the mean squared difference between the real x_{t-1} and the DDIM step from the
# real x_t with the perturbed latent's prediction (one number per perturbation); "paper": the channel
# mean of the x_{t-1} stepped from the perturbed latent (h * w numbers), weights averaged over them.
OUTPUTS = ("step-error", "paper")


def latent_picture(model, next_latents: torch.Tensor) -> np.ndarray:
    """The decoded x_{t-1} resized (anti-aliased) to the latent grid: float64 (h, w, 3) in [0, 1]."""
    picture = model.decode(next_latents, output_type="np")[0]  # (H, W, 3) in [0, 1]
    return resize(picture, tuple(next_latents.shape[-2:]), anti_aliasing=True).astype(np.float64)


def relabel(segments: np.ndarray) -> np.ndarray:
    """Labels 0..S-1 in order of their first appearance's value, same shape."""
    _, labels = np.unique(segments, return_inverse=True)
    return labels.reshape(segments.shape)


def superpixels(
    model,
    next_latents: torch.Tensor,
    segmentation: str = "auto",
    *,
    kernel_size: float = 4,
    max_dist: float = 200,
    ratio: float = 0.2,
    n_segments: int = 50,
    compactness: float = 10.0,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """Segments (h, w), labels 0..S-1, of the decoded x_{t-1} on the latent grid, and the segmenter used.

    ``segmentation`` as ``DFLime``'s: "quickshift" (``kernel_size``, ``max_dist``, ``ratio``, ``seed``),
    "slic" (``n_segments``, ``compactness``), or "auto": quickshift when it finds at least
    ``MIN_SEGMENTS`` segments, else SLIC.

    Raises:
        ValueError: the chosen segmenter found fewer than ``MIN_SEGMENTS`` segments.
    """
    check_choice("segmentation", segmentation, SEGMENTATIONS)
    picture = latent_picture(model, next_latents)
    grid = "x".join(map(str, picture.shape[:2]))
    if segmentation in ("auto", "quickshift"):
        segments = relabel(quickshift(picture, kernel_size=kernel_size, max_dist=max_dist, ratio=ratio, rng=seed))
        count = int(segments.max()) + 1
        if count >= MIN_SEGMENTS:
            return segments, "quickshift"
        if segmentation == "quickshift":
            raise ValueError(
                f"segmentation='quickshift' must give at least {MIN_SEGMENTS} segments, got {count} on the {grid} "
                f"latent grid (kernel_size={kernel_size}, max_dist={max_dist}, ratio={ratio}): use "
                f"segmentation='auto' or 'slic', or a smaller kernel_size."
            )
    segments = relabel(slic(picture, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1))
    count = int(segments.max()) + 1
    if count < MIN_SEGMENTS:
        raise ValueError(
            f"segmentation={segmentation!r} must give at least {MIN_SEGMENTS} segments, got {count} from SLIC on the "
            f"{grid} latent grid (n_segments={n_segments}, compactness={compactness}): raise n_segments."
        )
    return segments, "slic"


@dataclass(kw_only=True)
class DFLime(PerturbationMethod):
    """DF-LIME saliency of one step (docs/methods.md, DF-LIME).

    Args:
        n_samples: random on/off vectors (paper: 1000); the first one is all on, as in LIME.
        kernel_width: w of the proximity kernel ``exp(-d^2 / w^2)`` on the cosine distance d
            between an on/off vector and the all-on vector (paper: 0.25).
        ridge_alpha: regularisation of the ridge regression (LIME's default, 1.0).
        output: the model's output for a perturbation (``OUTPUTS``). "step-error" (default; our
            choice): minus the mean squared difference between the real x_{t-1} and the DDIM step
            taken from the real x_t with the perturbed latent's prediction, so that only the
            prediction differs (as DF-RISE's next-latent mode); a segment's weight is how much
            keeping it brings the step back. "paper": the channel mean of the x_{t-1} stepped from
            the perturbed latent at each latent pixel, the ridge weights for these h*w outputs
            averaged over them (our reading, equal to the weight for their mean); that x_{t-1}
            keeps a multiple of the perturbed x_t, so its weights follow x_t's own values.
        segmentation: the superpixels, all on the decoded x_{t-1} resized to the latent grid:
            "quickshift" is the paper's; "slic" is SLIC; "auto" (default) is quickshift where it
            finds at least 2 segments, else SLIC (``superpixels``). A segmentation of fewer than
            2 segments raises ValueError rather than giving a flat map.
        kernel_size, max_dist, ratio: quickshift's parameters (paper: 4, 200, 0.2).
        n_segments, compactness: SLIC's (our choice: about 50 seeds, colour against distance 10,
            scikit-image's default for Lab colours).
        seed: seed of the on/off vectors and of quickshift.
        batch_size: perturbed latents per denoiser forward pass.
    Returns (from ``explain``):
        ``Explanation`` with ``saliency`` (H_lat, W_lat): each segment painted with its weight,
        min-max; ``denoiser_calls`` = ceil(n_samples / batch_size).
    Raises (from ``explain``):
        ValueError: the segmentation has fewer than 2 segments (``superpixels``).
    """

    n_samples: int = option(1000, "Samples (the paper: 1000)", "How many random on/off patterns of the picture's regions "
                            "the model is asked about.")
    kernel_width: float = 0.25
    ridge_alpha: float = 1.0
    output: str = option("step-error", "What each pattern is scored by", "How close the step comes to the real next step "
                         "(step-error, recommended), or the average of the step's result (paper).", choices=OUTPUTS)
    kernel_size: float = 4
    max_dist: float = 200
    ratio: float = 0.2
    segmentation: str = option("auto", "How the picture is cut into regions", "The paper's quickshift where it finds "
                               "regions, else SLIC (auto, recommended), or either one alone.", choices=SEGMENTATIONS)
    n_segments: int = 50
    compactness: float = 10.0
    seed: int = option(0, "Seed", "The same seed gives the same patterns.")
    name = "df-lime"
    label = "DF-LIME"

    def _check_options(self) -> None:
        super()._check_options()
        check_int("n_samples", self.n_samples, 2, LIMITS.max_lime_samples)
        check_number("kernel_width", self.kernel_width, 0.0, 100.0, open_low=True)
        check_number("ridge_alpha", self.ridge_alpha, 0.0, 1e6)
        check_choice("output", self.output, OUTPUTS)
        check_number("kernel_size", self.kernel_size, 0.0, 100.0, open_low=True)
        check_number("max_dist", self.max_dist, 0.0, 1e6, open_low=True)
        check_number("ratio", self.ratio, 0.0, 1.0)
        check_choice("segmentation", self.segmentation, SEGMENTATIONS)
        check_int("n_segments", self.n_segments, MIN_SEGMENTS, 100_000)
        check_number("compactness", self.compactness, 0.0, 1e6, open_low=True)
        check_int("seed", self.seed, 0, 2**32 - 1)

    def perturbations(self, segment_count: int) -> np.ndarray:
        """(n_samples, S) on/off vectors from the seed; the first is all on."""
        vectors = np.random.default_rng(self.seed).integers(0, 2, size=(self.n_samples, segment_count))
        vectors[0] = 1
        return vectors

    def outputs(self, model, inputs, segments: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """The model's output for every perturbation, by ``output``: (n_samples, 1) for "step-error",
        (n_samples, h * w) for "paper"."""
        segment_map = torch.from_numpy(segments).to(inputs.latents.device)
        results = []
        for start, stop in batches(len(vectors), self.batch_size):
            on = torch.from_numpy(vectors[start:stop]).to(inputs.latents.device, inputs.latents.dtype)
            masks = on[:, segment_map][:, None]  # (B, 1, h, w): each pixel takes its segment's switch
            perturbed = masks * inputs.latents
            with torch.no_grad():
                prediction = guided_prediction(model, inputs, perturbed)
                if self.output == "paper":  # the step from the perturbed latent
                    predicted_next = step_from(model, inputs, perturbed, prediction).float()
                    results.append(predicted_next.mean(1).flatten(1).cpu().numpy())
                    continue
                predicted_next = step_from(model, inputs, inputs.latents.expand_as(perturbed), prediction).float()
                error = (predicted_next - inputs.next_latents.float()).pow(2).flatten(1).mean(1)
            results.append(-error[:, None].cpu().numpy())
        return np.concatenate(results)

    def _explain(self, model, run, step):
        inputs = step_inputs(model, run, step)
        segments, _ = superpixels(
            model, inputs.next_latents, self.segmentation, kernel_size=self.kernel_size, max_dist=self.max_dist,
            ratio=self.ratio, n_segments=self.n_segments, compactness=self.compactness, seed=self.seed,
        )
        vectors = self.perturbations(int(segments.max()) + 1)
        outputs = self.outputs(model, inputs, segments, vectors)
        distances = pairwise_distances(vectors, vectors[:1], metric="cosine").ravel()
        proximity = np.exp(-(distances**2) / self.kernel_width**2)
        regression = Ridge(alpha=self.ridge_alpha, fit_intercept=True).fit(vectors, outputs, sample_weight=proximity)
        weights = regression.coef_.reshape(outputs.shape[1], -1).mean(0)  # (outputs, S) -> (S,)
        return self._result(run, step, weights[segments], denoiser_calls=len(batches(len(vectors), self.batch_size)))
