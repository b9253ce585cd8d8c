"""Read colour, place and shape of the main shape from an RGB image alone."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from skimage.color import rgb2hsv
from skimage.measure import label, regionprops

from explainer.shapes.world import COLOURS, PLACES, SHAPES

MIN_SATURATION = 0.4
MIN_VALUE = 0.3
MIN_PIXELS = 12

_REFERENCE_HUES = {
    name: float(rgb2hsv(np.array([[rgb]], np.uint8))[0, 0, 0]) for name, rgb in COLOURS.items()
}


@dataclass
class Detection:
    colour: str
    place: str
    shape: str
    mask: np.ndarray = field(repr=False)  # bool, same H x W as the image


def saturated_mask(image: np.ndarray) -> np.ndarray:
    """Pixels saturated and bright enough to belong to a shape."""
    hsv = rgb2hsv(image)
    return (hsv[..., 1] > MIN_SATURATION) & (hsv[..., 2] > MIN_VALUE)


def generated_shape_mask(image: np.ndarray) -> np.ndarray:
    """Boolean mask of the main (largest saturated) shape in an RGB uint8 image.

    This is the checker's foreground segmentation of a generated image; it is
    empty when no shape is found. Use it as the expected region when scoring
    attention maps of the shape's words against the generated picture.
    """
    labels = label(saturated_mask(image), connectivity=1)
    if labels.max() == 0:
        return np.zeros(image.shape[:2], bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _nearest_colour(hues: np.ndarray) -> str:
    angles = hues * 2 * np.pi
    mean = np.arctan2(np.sin(angles).mean(), np.cos(angles).mean()) / (2 * np.pi) % 1.0

    def distance(name: str) -> float:
        d = abs(mean - _REFERENCE_HUES[name])
        return min(d, 1 - d)

    return min(COLOURS, key=distance)


def _nearest_place(row: float, col: float, size: int) -> str:
    scale = size / 64.0
    return min(PLACES, key=lambda p: (PLACES[p][0] * scale - col) ** 2
               + (PLACES[p][1] * scale - row) ** 2)


def _shape_templates(height: int, width: int) -> dict[str, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u = (xs + 0.5) / width  # 0..1 across the box
    v = (ys + 0.5) / height
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), bool),
        "triangle": np.abs(u - 0.5) <= v / 2,  # apex at the top
    }


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose template, stretched to the mask's box, overlaps it best."""
    region = regionprops(mask.astype(np.uint8))[0]
    r0, c0, r1, c1 = region.bbox
    crop = mask[r0:r1, c0:c1]
    templates = _shape_templates(r1 - r0, c1 - c0)

    def iou(name: str) -> float:
        t = templates[name]
        return (t & crop).sum() / max(1, (t | crop).sum())

    return max(SHAPES, key=iou)


def detect(image: np.ndarray) -> Detection | None:
    """Colour, place and shape of the main shape, or None if there is none."""
    mask = generated_shape_mask(image)
    if mask.sum() < MIN_PIXELS:
        return None
    hues = rgb2hsv(image)[..., 0][mask]
    rows, cols = np.nonzero(mask)
    return Detection(
        colour=_nearest_colour(hues),
        place=_nearest_place(rows.mean(), cols.mean(), image.shape[0]),
        shape=classify_shape(mask),
        mask=mask,
    )
