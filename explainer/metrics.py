"""How good is a map: insertion/deletion curves and their area, correlation, localisation against a mask
(pointing game, IoU; docs/methods.md).

Example:
    >>> result = insertion_deletion(model, run, step=15, saliency=explanation.saliency)
    >>> result["insertion_auc"], result["deletion_auc"]
    >>> spearman(rise.saliency, cam.saliency)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from .config import LIMITS
from .methods.base import batches, check_choice, check_int
from .replay import guided_prediction, step_from, step_inputs
from .models import LoadedModel
from .maps import normalise
from .run import RunData

DISTANCES = ("1-ssim", "mse")
# What stands in for removed latent pixels (docs/methods.md, Insertion and deletion): a blur or zeros, the
# model's own inpainting with the prompt, or with the empty prompt (which does not paint the prompt back).
FILLS = ("blur", "inpaint", "inpaint-empty")
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0


def auc(curve) -> float:
    """Area under ``curve`` min-max normalised to [0, 1], by trapezoids over an x-axis from 0 to 1.

    A constant curve has area 0 (its normalised values are all 0).
    """
    values = normalise(np.asarray(curve, dtype=np.float64))
    if values.size < 2:
        raise ValueError(f"curve must have at least 2 points, got {values.size}.")
    return float(np.trapezoid(values, dx=1.0 / (values.size - 1)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps of the same shape (flattened); NaN when one is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps must have the same shape, got {a.shape} and {b.shape}.")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def inside_outside_ratio(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Mean of the map inside a boolean mask over its mean outside (> 1: the map favours the region)."""
    saliency, mask = np.asarray(saliency, dtype=np.float64), np.asarray(mask, dtype=bool)
    if saliency.shape != mask.shape:
        raise ValueError(f"saliency and mask must have the same shape, got {saliency.shape} and {mask.shape}.")
    if mask.all() or not mask.any():
        raise ValueError("mask must have pixels both inside and outside the region.")
    outside = saliency[~mask].mean()
    return float(saliency[mask].mean() / outside) if outside > 0 else float("inf")


def mask_on_grid(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A pixel mask on the latent grid: a latent pixel is in when at least half its patch is."""
    small = Image.fromarray(mask.astype(np.float32)).resize((size[1], size[0]), Image.Resampling.BOX)
    return np.asarray(small) >= 0.5


def pointing_game(saliency: np.ndarray, mask: np.ndarray) -> float:
    """1 when the map's maximum falls on the mask (dilated by one latent pixel, the usual tolerance)."""
    from scipy.ndimage import binary_dilation

    peak = np.unravel_index(np.argmax(saliency), saliency.shape)
    return float(binary_dilation(mask)[peak])


def iou(saliency: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the map thresholded at its mean with the mask."""
    region = saliency > saliency.mean()
    union = (region | mask).sum()
    return float((region & mask).sum() / union) if union else 0.0


def on_pixels(saliency: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A latent-grid map brought to a (H, W) pixel grid by bilinear interpolation, as segmentation from
    attention maps upsamples them."""
    saliency = np.asarray(saliency, dtype=np.float32)
    if saliency.shape == tuple(size):
        return saliency
    return np.asarray(Image.fromarray(saliency).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of ``scores`` ranking the true ``labels`` first (the area under the precision-recall
    curve as scikit-learn's ``average_precision_score`` steps it; tied scores form one threshold)."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
    positives = labels.sum()
    if positives == 0:
        raise ValueError("average precision needs at least one positive pixel.")
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_ties = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # each distinct threshold
    hits = np.cumsum(labels)[last_of_ties]
    precision = hits / (last_of_ties + 1)
    recall_gained = np.diff(np.r_[0, hits]) / positives
    return float((precision * recall_gained).sum())


def segmentation_scores(saliency: np.ndarray, mask: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    """A concept's map against its pixel mask, as zero-shot segmentation from attention is scored
    (ConceptAttention's protocol): the map upsampled to the mask's grid and thresholded at its mean
    (foreground above it), then ``miou``, the mean of the foreground's and the background's IoU;
    ``pixel_accuracy``; ``average_precision`` of the soft map; and ``iou`` of the foreground alone.
    ``valid``: the pixels that count (a data set's "void" label left out)."""
    mask = np.asarray(mask, bool)
    valid = np.ones_like(mask) if valid is None else np.asarray(valid, bool)
    values = on_pixels(saliency, mask.shape)
    if not mask[valid].any() or mask[valid].all():
        raise ValueError("mask must have pixels both inside and outside the concept.")
    predicted = values > values[valid].mean()
    truth, predicted, values = mask[valid], predicted[valid], values[valid]
    ious = [float((predicted & truth).sum() / (predicted | truth).sum()),
            float((~predicted & ~truth).sum() / (~predicted | ~truth).sum())]
    return {"miou": float(np.mean(ious)), "iou": ious[0], "pixel_accuracy": float((predicted == truth).mean()),
            "average_precision": average_precision(values, truth)}


def blur_latents(latents: torch.Tensor, kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Per-channel Gaussian blur of (B, C, h, w) latents (edges replicated)."""
    offsets = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    line = (line / line.sum()).to(latents.device, torch.float32)
    window = torch.outer(line, line).expand(latents.shape[1], 1, kernel, kernel)
    padded = F.pad(latents.float(), [kernel // 2] * 4, mode="replicate")
    return F.conv2d(padded, window, groups=latents.shape[1]).to(latents.dtype)


def inpainted(model: LoadedModel, inputs, keep: torch.Tensor, batch_size: int = 8, seed: int = 0,
              prompt: bool = True) -> torch.Tensor:
    """x_t of step ``inputs`` with the latent pixels outside each mask of ``keep`` (S, 1, h, w; 1 = keep)
    filled by the model's own inpainting: the region starts as noise at the run's first timestep and is
    denoised along the run's timesteps down to x_t's, with the prompt and the run's guidance (``prompt``)
    or with the empty prompt alone, the kept pixels re-imposed at every level (RePaint's scheme, with
    deterministic steps). The kept content at each level is the real x_t's
    clean and noise estimates renoised to that level, which is x_t itself at the step's own level. What
    fills the region is in distribution for the model, unlike a blur or zeros (Cohen, Chefer & Wolf, 2025).
    Costs 1 + (the step's index - 1) denoiser calls per ``batch_size`` masks."""
    family, scheduler, latents = model.family, inputs.scheduler, inputs.latents
    timesteps = [t.item() for t in scheduler.timesteps]
    here = timesteps.index(inputs.timestep)
    fresh = torch.randn((len(keep), *latents.shape[1:]), generator=torch.Generator().manual_seed(seed)).to(latents)
    filled = []
    with torch.no_grad():
        filling = inputs if prompt else dataclasses.replace(
            inputs, conditioning=model.encode("", "", False, guidance=inputs.guidance).detached(), guided=False)
        prediction = guided_prediction(model, inputs, latents)
        clean = family.clean_estimate(scheduler, latents, prediction, inputs.timestep)
        noise = family.noise_estimate(scheduler, latents, prediction, inputs.timestep)
        known = {level: family.noised(scheduler, clean, noise, level).to(latents.dtype) for level in timesteps[:here]}
        for start, stop in batches(len(keep), batch_size):
            mask = keep[start:stop]
            region = family.noised(scheduler, torch.zeros_like(fresh[start:stop]), fresh[start:stop], timesteps[0]).to(latents.dtype)
            for level, below in zip(timesteps[:here], timesteps[1:here + 1]):
                state = mask * known[level] + (1 - mask) * region
                at_level = dataclasses.replace(filling, timestep=level, next_timestep=below)
                region = step_from(model, at_level, state, guided_prediction(model, at_level, state)).to(latents.dtype)
            filled.append(mask * latents + (1 - mask) * region)
    return torch.cat(filled)


def latent_order(saliency: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Latent pixel indices (h * w,) from most to least salient; the map is resized to the latent grid."""
    saliency = np.asarray(saliency, dtype=np.float32)
    if saliency.shape != tuple(size):
        tensor = torch.from_numpy(saliency)[None, None]
        saliency = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    return np.argsort(-saliency.ravel(), kind="stable")


def _distance(images: np.ndarray, target: np.ndarray, kind: str) -> list[float]:
    if kind == "mse":
        return [float(((image - target) ** 2).mean()) for image in images]
    return [1.0 - float(structural_similarity(image, target, channel_axis=-1, data_range=1.0)) for image in images]


def insertion_deletion(
    model: LoadedModel, run: RunData, step: int, saliency: np.ndarray, distance: str = "1-ssim", batch_size: int = 8,
    fill: str = "blur",
) -> dict:
    """Insertion and deletion curves of a map at one step (docs/methods.md, Insertion and deletion), in latent space.

    Insertion starts from x_t blurred per channel (Gaussian, kernel 11, sigma 5) and reveals the
    real x_t; deletion starts from x_t and sets latent pixels to 0. With ``fill="inpaint"`` what is not
    revealed, or is removed, is the model's own inpainting of it instead, with the prompt; with
    ``"inpaint-empty"`` with the empty prompt (``inpainted``: in distribution, at the cost of up to
    ``step`` - 1 denoiser calls per batch of states). Each move changes W_lat latent
    pixels in descending saliency, so each curve has H_lat + 1 states. A state's score is the
    distance between the decoded DDIM step from its guided prediction and the decoded real x_{t-1}.
    Distances fall along the insertion curve and rise along the deletion curve: a faithful map
    gives a *low* insertion AUC and a *high* deletion AUC.

    Args:
        saliency: any 2-D map (resized to the latent grid when needed).
        distance: "1-ssim" (scikit-image SSIM on the decoded images) or "mse".
        batch_size: states per denoiser forward pass.
        fill: "blur" (the paper's), "inpaint" or "inpaint-empty".
    Returns:
        {"insertion": [H_lat + 1 floats], "deletion": [...], "insertion_auc", "deletion_auc",
        "distance", "denoiser_calls"}.
    """
    scored = insertion_deletion_by_distance(model, run, step, saliency, (distance,), batch_size, fill)
    return {**scored[distance], "distance": distance, "fill": fill, "denoiser_calls": scored["denoiser_calls"]}


def insertion_deletion_by_distance(
    model: LoadedModel, run: RunData, step: int, saliency: np.ndarray, distances=DISTANCES, batch_size: int = 8,
    fill: str = "blur",
) -> dict:
    """``insertion_deletion`` scored with several distances from the same decoded states (no extra cost).

    Returns:
        {distance: {"insertion", "deletion", "insertion_auc", "deletion_auc"}, ..., "denoiser_calls"}.
    """
    for distance in distances:
        check_choice("distance", distance, DISTANCES)
    check_choice("fill", fill, FILLS)
    check_int("batch_size", batch_size, 1, LIMITS.max_batch_size)
    if not run.records:
        raise ValueError("run has no recorded steps yet.")
    check_int("step", step, 1, len(run.records))
    if np.asarray(saliency).ndim != 2:
        raise ValueError(f"saliency must be a 2-D map, got shape {np.asarray(saliency).shape}.")
    inputs = step_inputs(model, run, step)
    latents = inputs.latents
    height, width = latents.shape[-2:]
    order = torch.from_numpy(latent_order(saliency, (height, width))).to(latents.device)
    revealed = torch.zeros(height + 1, height * width, device=latents.device, dtype=latents.dtype)
    for move in range(1, height + 1):
        revealed[move, order[: move * width]] = 1
    revealed = revealed.view(height + 1, 1, height, width)  # (states, 1, h, w)
    fill_calls = 0
    if fill == "blur":
        insertion = blur_latents(latents) * (1 - revealed) + latents * revealed
        deletion = latents * (1 - revealed)
        states = torch.cat([insertion, deletion])  # (2 (H + 1), C, h, w)
    else:
        keep = torch.cat([revealed, 1 - revealed])
        states = inpainted(model, inputs, keep, batch_size, prompt=fill == "inpaint")
        fill_calls = 1 + (step - 1) * len(batches(len(keep), batch_size))
    target = model.decode(inputs.next_latents, output_type="np")[0]
    scores, chunks = {distance: [] for distance in distances}, batches(len(states), batch_size)
    for start, stop in chunks:
        with torch.no_grad():
            batch = states[start:stop]
            predicted_next = step_from(model, inputs, batch, guided_prediction(model, inputs, batch))
        images = model.decode(predicted_next, output_type="np")
        for distance in distances:
            scores[distance] += _distance(images, target, distance)
    result: dict = {"denoiser_calls": len(chunks) + fill_calls}
    for distance, values in scores.items():
        curves = {"insertion": values[: height + 1], "deletion": values[height + 1 :]}
        result[distance] = {**curves, "insertion_auc": auc(curves["insertion"]), "deletion_auc": auc(curves["deletion"])}
    return result
