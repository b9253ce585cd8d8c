"""What the shape and ground phases learn from: each cached scene's shape outlines and shape nouns
on the latent grid, the cross-attention probabilities with their graph, and the grounding loss."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from explainer.capture import classic_attention
from explainer.shapes.architecture import SD1
from explainer.shapes.tokenizer import MODEL_MAX_LENGTH
from explainer.shapes.training import log, scene_seed
from explainer.shapes.world import SHAPES, generate_scene


def latent_cells(mask: np.ndarray) -> np.ndarray:
    """The share of each 4x4 pixel cell (one latent cell) that a 64x64 mask covers."""
    height, width = mask.shape
    return mask.reshape(height // 4, 4, width // 4, 4).mean(axis=(1, 3))


def shape_outline(scene) -> np.ndarray:
    """Share of each 4x4 pixel cell (one latent cell) on a shape's outline, +-2 pixels: where a
    circle and a square of the same place and size differ."""
    from scipy import ndimage

    outline = np.zeros(scene.image.shape[:2], bool)
    for item in scene.shapes:
        outline |= ndimage.binary_dilation(item.mask, iterations=2) & ~ndimage.binary_erosion(item.mask, iterations=2)
    return latent_cells(outline)


def cache_outlines(args, work: Path) -> None:
    """The outline share per latent cell of every cached scene (for the shape phase's loss)."""
    path = work / "outlines.npy"
    if path.exists():
        return
    outlines = np.stack([shape_outline(generate_scene(scene_seed(args, i))) for i in range(args.scenes)])
    np.save(work / "outlines.tmp.npy", outlines.astype(np.float16))
    os.replace(work / "outlines.tmp.npy", path)
    log(f"outlines cached: {outlines.shape}, mean {outlines.mean():.4f}")


def cache_nouns(args, work: Path) -> None:
    """Each cached caption's shape nouns: their token positions (in caption order, -1 for none)
    and, per noun, the share of each latent cell its shape covers (for the ground phase)."""
    from transformers import CLIPTokenizer

    path = work / "nouns.npz"
    if path.exists():
        return
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    noun_ids = {tokenizer.convert_tokens_to_ids(word + "</w>") for word in SHAPES}
    positions = np.full((args.scenes, 2), -1, np.int16)
    cover = np.zeros((args.scenes, 2, 16, 16), np.float16)
    for i in range(args.scenes):
        scene = generate_scene(scene_seed(args, i))
        ids = tokenizer(scene.caption, max_length=MODEL_MAX_LENGTH, truncation=True)["input_ids"]
        found = [k for k, token in enumerate(ids) if token in noun_ids]
        assert len(found) == len(scene.shapes), scene.caption  # the captions name each shape once, in order
        for slot, (position, item) in enumerate(zip(found, scene.shapes)):
            positions[i, slot] = position
            cover[i, slot] = latent_cells(item.mask)
    np.savez(work / "nouns.tmp.npz", positions=positions, cover=cover)
    os.replace(work / "nouns.tmp.npz", path)
    log(f"shape nouns cached: {int((positions >= 0).sum())} nouns in {args.scenes} captions")


class ProbabilityTap:
    """A cross-attention processor (diffusers' classic maths) that keeps each layer's
    probabilities, with their graph, for the grounding loss."""

    def __init__(self, found: list):
        self.found = found

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        return classic_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                  on_probs=lambda probs: self.found.append((probs, attn.heads)))


def tap_cross_attention(unet) -> list:
    """Install ``ProbabilityTap`` on every cross-attention layer; returns the list it fills."""
    found: list = []
    cross = set(SD1.cross_attention_sites(unet))
    unet.set_attn_processor({name: ProbabilityTap(found) if name in cross else processor
                             for name, processor in unet.attn_processors.items()})
    return found


def grounding_loss(found: list, positions: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al., CVPR 2024), per layer and per shape noun:
    (1 - the share of the noun's attention, mean over heads, that falls on its shape)^2, with
    the shape's cover of each cell of the layer's grid (area means of the 16x16 cover).

    positions: (batch, slots) noun token positions, -1 for none; cover: (batch, slots, 16, 16).
    """
    batch, slots = positions.shape
    valid = positions >= 0
    losses = []
    for probs, heads in found:
        _, tokens, text_length = probs.shape
        mean = probs.view(batch, heads, tokens, text_length).mean(1)  # (batch, N, L)
        grid = SD1.layer_grid(tokens, tuple(cover.shape[-2:]))
        cells = F.adaptive_avg_pool2d(cover, grid).flatten(2)  # (batch, slots, N)
        noun = torch.gather(mean, 2, positions.clamp(min=0).long()[:, None, :].expand(batch, tokens, slots)).transpose(1, 2)
        inside = (noun * cells).sum(-1) / noun.sum(-1).clamp(min=1e-8)
        losses.append((1 - inside).pow(2)[valid])
    return torch.cat(losses).mean()
