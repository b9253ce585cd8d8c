"""Where one spot of the picture looks at a step: its self-attention over the picture (the
denoiser's attention among image tokens, computed again for that step) and its cross-attention to
the prompt's words (read from the run's record). Not a saliency method of the paper: the app's
region view (docs/methods.md, Region view).

    >>> found = SpotAttention(row=4, column=3).explain(model, run, step=15)
    >>> found.saliency.shape, found.token_scores  # (H_lat, W_lat), {"0:a": share, "2:circle": share, ...}
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..replay import raw_prediction, step_inputs
from ..run import check_int
from .base import Explanation, Method


@dataclass(kw_only=True)
class SpotAttention(Method):
    """The spot at latent cell (``row``, ``column``) of the explained step.

    Returns (from ``explain``):
        ``Explanation`` with ``saliency`` the spot's self-attention over the latent grid (heads
        and layers averaged, each layer's map bilinearly resized, min-max), ``token_scores`` the
        share of the spot's cross-attention that goes to each word (its pieces summed; the rest
        goes to the start, end and padding tokens), ``denoiser_calls`` = 1.
    """

    row: int = 0
    column: int = 0
    name = "spot-attention"
    label = "Where a spot looks"
    saliency_tab = False

    def _check_options(self) -> None:
        check_int("row", self.row, 0, 1 << 30)
        check_int("column", self.column, 0, 1 << 30)

    def _explain(self, model, run, step: int) -> Explanation:
        height, width = run.latent_size
        check_int("row", self.row, 0, height - 1)
        check_int("column", self.column, 0, width - 1)
        inputs = step_inputs(model, run, step)
        collector = _SelfAttention(model.family, (self.row, self.column), run.latent_size,
                                   conditional_index=inputs.conditioning.halves - 1, batch_size=inputs.conditioning.halves)
        with torch.no_grad(), _explicit_attention(model, collector):
            raw_prediction(model, inputs, inputs.latents)
        record = run.records[step - 1]
        height, width = record.attention.shape[1:]  # the maps' grid: an MM-DiT's token grid is coarser
        shares = record.attention[:, self.row * height // run.latent_size[0], self.column * width // run.latent_size[1]]
        shares = shares.astype(np.float32)
        words = {f"{i}:{w.text}": float(shares[list(w.positions)].sum()) for i, w in enumerate(run.tokens.words)}
        explanation = self._result(run, step, collector.mean(), token_scores=words)
        explanation.denoiser_calls = 1
        return explanation


class _SelfAttention:
    """Sums one query spot's attention over the image tokens, layer by layer, on the latent grid."""

    def __init__(self, family, spot: tuple[int, int], latent_size: tuple[int, int], conditional_index: int, batch_size: int):
        self.family, self.spot, self.latent_size = family, spot, latent_size
        self.conditional_index, self.batch_size = conditional_index, batch_size
        self.total = torch.zeros(latent_size)
        self.layers = 0

    def add(self, probs: torch.Tensor, kind: str, image_tokens: int) -> None:
        """``probs`` (batch * heads, rows, keys) of a "self" or "joint" attention (image tokens first)."""
        if kind == "cross":
            return
        rows = probs.shape[1]
        heads = probs.shape[0] // self.batch_size
        probs = probs.view(self.batch_size, heads, rows, probs.shape[2])[self.conditional_index].float().mean(0)
        probs = probs[:image_tokens, :image_tokens]
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)  # joint: the image keys' share, renormalised
        grid_h, grid_w = self.family.layer_grid(image_tokens, self.latent_size)
        row = self.spot[0] * grid_h // self.latent_size[0]
        column = self.spot[1] * grid_w // self.latent_size[1]
        keys = probs[row * grid_w + column].reshape(1, 1, grid_h, grid_w)
        if (grid_h, grid_w) != self.latent_size:
            keys = F.interpolate(keys, size=self.latent_size, mode="bilinear", align_corners=False)
        self.total += keys[0, 0].cpu()
        self.layers += 1

    def mean(self) -> np.ndarray:
        if not self.layers:
            raise ValueError("This denoiser has no attention among image tokens to read.")
        return (self.total / self.layers).numpy()


@contextmanager
def _explicit_attention(model, collector: _SelfAttention):
    """Forward hooks that compute every denoiser attention again, explicitly, from the same inputs
    and hand its probabilities to ``collector``, for this thread only; outputs are left as they are."""
    thread = threading.get_ident()

    def hook(module, args, kwargs, output):
        if threading.get_ident() != thread:
            return None
        model.family.hooked_attention(module, args, kwargs, collector.latent_size, collector.add)
        return None

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.family.attention_modules(model.denoiser)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
