"""Saliency maps as arrays: what the methods and metrics share (no pictures here)."""

from __future__ import annotations

import numpy as np


def normalise(saliency: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] in float32; a constant map becomes all zeros."""
    saliency = np.asarray(saliency, dtype=np.float32)
    low, high = float(saliency.min()), float(saliency.max())
    if high - low < 1e-12:
        return np.zeros_like(saliency)
    return (saliency - low) / (high - low)
