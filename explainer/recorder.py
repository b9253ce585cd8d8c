"""What a run keeps of one step's attention: ``AttentionRecorder`` reduces each recorded layer's
probabilities to the prompt's token maps (conditional half, heads averaged, padding summed), the
text share of joint attention, and per-group means, as the capture processors (``capture``) hand
them over."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import LIMITS


class AttentionRecorder:
    """Collects one step's cross-attention maps of one run (conditional half, heads averaged).

    Args:
        family: the model family's adapter (where a site's grid and group come from).
        latent_size: ``(H_lat, W_lat)``, the latent grid. A step's map is kept at the finest grid of
            its layers (the latent grid in a UNet; an MM-DiT's token grid, H_lat / patch), coarser
            layers' maps resized to it: an MM-DiT's maps at the latent grid would only be upsampled
            copies, 4x the bytes at a patch of 2 (docs/design.md, "Memory of an MM-DiT's records").
        kept_positions: token positions kept one by one (start, prompt pieces, end token);
            the remaining positions (padding) are summed into one extra row.
        conditional_index: which item of the denoiser batch is the conditional prompt
            (1 under classifier-free guidance, where diffusers puts the negative prompt first).
        batch_size: the denoiser batch size (2 under guidance).
        per_group: also keep each layer group's mean map (layers of one block kind and resolution,
            e.g. "up 16×16"; docs/methods.md, Cross-attention maps) at its own resolution, pooled to at most
            ``max_group_side``. Averaging layers before or after upsampling gives the same map
            (bilinear resizing is linear), so subset views need no per-layer maps.
        sites: every recorded site in forward order (``family.cross_attention_sites``), for
            families whose groups depend on the depth (an MM-DiT's thirds of its blocks).
    """

    def __init__(
        self,
        family,
        latent_size: tuple[int, int],
        kept_positions: int,
        conditional_index: int,
        batch_size: int,
        per_group: bool = False,
        max_group_side: int = LIMITS.max_group_map_side,
        sites: Sequence[str] = (),
    ):
        self.family = family
        self.latent_size = latent_size
        self.kept_positions = kept_positions
        self.conditional_index = conditional_index
        self.batch_size = batch_size
        self.per_group = per_group
        self.max_group_side = max_group_side
        self.sites = tuple(sites)
        self.groups: dict[str, list[str]] = {}  # group label -> its layer keys, in forward order
        self._reset()

    def _reset(self) -> None:
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._group_sums: dict[str, torch.Tensor] = {}
        self._share_sum: torch.Tensor | None = None
        self._share_count = 0

    def add(self, layer: str, probs: torch.Tensor, heads: int) -> None:
        """Record cross-attention ``probs`` of shape (batch * heads, N image tokens, L text tokens)."""
        _, tokens, text_length = probs.shape
        # (batch, heads, N, L) -> conditional prompt, mean over heads -> (N, L)
        self._add_maps(layer, probs.view(self.batch_size, heads, tokens, text_length)[self.conditional_index].float().mean(0))

    def add_joint(self, layer: str, probs: torch.Tensor, heads: int, image_tokens: int) -> None:
        """Record joint-attention ``probs`` (batch * heads, N + L, N + L), image tokens first: the
        image queries' attention to the text keys, renormalised over the text keys (each image
        token's distribution over the text, as cross-attention gives), and the text share, the
        part of each image query's attention that goes to the text at all."""
        total = probs.shape[-1]
        probs = probs.view(self.batch_size, heads, total, total)[self.conditional_index]
        to_text = probs[:, :image_tokens, image_tokens:].float()  # (heads, N, L)
        share = to_text.sum(-1)  # (heads, N)
        self._add_maps(layer, (to_text / share.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).mean(0))
        self._add_share(share.mean(0))

    def _add_maps(self, layer: str, probs: torch.Tensor) -> None:
        """Add one layer's conditional, head-averaged maps (N, L), each image token's row summing to 1."""
        tokens = probs.shape[0]
        kept = self.kept_positions
        reduced = torch.cat([probs[:, :kept], probs[:, kept:].sum(1, keepdim=True)], dim=1)  # (N, kept + 1)
        height, width = self.family.layer_grid(tokens, self.latent_size)
        maps = reduced.T.reshape(kept + 1, height, width)
        if self.per_group:
            self._add_to_group(layer, maps)
        self._sum = _summed(self._sum, maps)
        self._count += 1

    def _add_share(self, share: torch.Tensor) -> None:
        """Add one layer's text share per image token (N,), on the layer's grid."""
        height, width = self.family.layer_grid(share.shape[0], self.latent_size)
        self._share_sum = _summed(self._share_sum, share.reshape(1, height, width))
        self._share_count += 1

    def _add_to_group(self, layer: str, maps: torch.Tensor) -> None:
        label = self.family.layer_group(layer, maps.shape[1:], self.sites)
        members = self.groups.setdefault(label, [])
        if layer not in members:
            members.append(layer)
        total = self._group_sums.get(label)
        self._group_sums[label] = maps if total is None else total + maps

    def text_share(self) -> np.ndarray | None:
        """The step's text share so far, averaged over the joint-attention layers: float16
        (h, w) on the maps' grid, in [0, 1]; None where no joint attention was recorded (cross-attention gives
        all of its mass to the text). Read it before ``finish_step``, which starts the next step."""
        if self._share_sum is None:
            return None
        return (self._share_sum[0] / self._share_count).to(torch.float16).cpu().numpy()

    def finish_step(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The step's layer-averaged maps (kept + 1, h, w) on its finest layer's grid, and the per-group
        maps, float16."""
        if self._sum is None:
            raise RuntimeError(
                "No cross-attention was captured in this step: is the denoiser inside `capture_attention`, "
                "and was the recorder passed to the denoiser call (family.predict(..., recorder=...))?"
            )
        mean = (self._sum / self._count).to(torch.float16).cpu().numpy()
        groups = {label: self._group_mean(label, total) for label, total in self._group_sums.items()}
        self._reset()
        return mean, groups

    def _group_mean(self, label: str, total: torch.Tensor) -> np.ndarray:
        mean = total / len(self.groups[label])
        height, width = mean.shape[1:]
        pooled = (min(height, self.max_group_side), min(width, self.max_group_side))
        if pooled != (height, width):
            mean = F.adaptive_avg_pool2d(mean, pooled)  # area means: rows still sum to 1 over tokens
        return mean.to(torch.float16).cpu().numpy()


def _summed(total: torch.Tensor | None, maps: torch.Tensor) -> torch.Tensor:
    """``total + maps`` (each (rows, h, w)) on the finer of their two grids, the coarser resized
    bilinearly (convex weights: maps that sum to 1 over the rows still do)."""
    if total is None:
        return maps
    size = max(total.shape[1:], maps.shape[1:], key=lambda grid: grid[0] * grid[1])

    def on_grid(values):
        if values.shape[1:] == size:
            return values
        return F.interpolate(values[None], size=size, mode="bilinear", align_corners=False)[0]

    return on_grid(total) + on_grid(maps)
