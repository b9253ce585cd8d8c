"""Pictures for a person: a step's picture, enlarged for the screen, and a map laid over a picture in
the paper's JET mix (docs/methods.md, Terms)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from PIL import Image

from ..maps import normalise

if TYPE_CHECKING:
    from ..run import StepRecord

_JET = matplotlib.colormaps["jet"]


def step_picture(record: StepRecord, view: str = "prediction") -> Image.Image:
    """The step's picture at the image's size: the VAE view when decoded at that step, else the fast preview."""
    if view not in ("prediction", "noisy"):
        raise ValueError(f"view must be 'prediction' or 'noisy', got {view!r}.")
    decoded = record.prediction_view if view == "prediction" else record.noisy_view
    if decoded is not None:
        return decoded
    small = record.preview_prediction if view == "prediction" else record.preview_noisy
    return small.resize(record.image_size, Image.Resampling.BILINEAR)


def for_display(image: Image.Image, min_side: int = 320) -> Image.Image:
    """Enlarge small pictures (the embedded model makes 64x64) with crisp pixels for the screen."""
    scale = -(-min_side // min(image.size))
    if scale <= 1:
        return image
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def overlay(image: Image.Image, saliency: np.ndarray, opacity: float = 1.0, scale: float | None = None) -> Image.Image:
    """JET overlay as in the paper: ``(1 - m^0.8) I + m^0.8 H`` with ``m`` the map in [0, 1].

    The map is min-max normalised (the paper's), or divided by ``scale`` and clipped when given
    (maps drawn on one scale, 0 at the bottom), then resized bilinearly to the image; ``opacity``
    scales the mix.
    """
    if scale is None:
        m = normalise(saliency)
    else:
        m = np.clip(np.asarray(saliency, dtype=np.float32) / max(float(scale), 1e-12), 0, 1)
    m = np.asarray(Image.fromarray(m).resize(image.size, Image.Resampling.BILINEAR), dtype=np.float32).clip(0, 1)
    weight = (m**0.8 * opacity)[..., None]
    heat = _JET(m)[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    mixed = (1 - weight) * base + weight * heat
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


def colour_scale(width: int = 320, height: int = 18) -> Image.Image:
    """The JET colour bar used by every overlay: blue = least, red = most of that map."""
    ramp = np.tile(np.linspace(0, 1, width, dtype=np.float32), (height, 1))
    return Image.fromarray((_JET(ramp)[..., :3] * 255).astype(np.uint8))


def mark_spot(image: Image.Image, x: float, y: float) -> Image.Image:
    """``image`` with a ring at (``x``, ``y``), fractions of its width and height from the top left."""
    from PIL import ImageDraw

    marked = image.copy()
    centre = (x * image.width, y * image.height)
    radius = max(4, image.width // 40)
    pen = ImageDraw.Draw(marked)
    for width, colour in ((4, "black"), (2, "white")):
        pen.ellipse([centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius], outline=colour, width=width)
    return marked
