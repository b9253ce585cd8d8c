"""Concept maps of an MM-DiT in the attention's output space (ConceptAttention, Helbling et al., 2025),
for the SD 3 and FLUX.1 families.

Concept tokens ride along the text stream of every joint-attention block, read-only for the image:
each block, a concept's query attends over [the block's image keys; the concept keys], its output
goes through the block's text-stream projection, gates and feed-forward, and nothing flows back into
the image or the prompt, so the prediction is the model's own, bit for bit. The concept map of a
block is, for every image token, the softmax over the concepts of the dot products between the
image token's attention output and each concept's; maps are averaged over the chosen blocks. The
raw-attention maps beside them: each image query's attention over the concept keys alone.

On FLUX.1 the blocks are the double-stream ones (``transformer_blocks``: separate text and image
projections), as the authors ride them; the single-stream blocks that follow carry no concepts. The
image's queries and keys take their rotary embeddings as the block's attention gives them; the
concepts take the text's position ids (FLUX's are all zero: no rotation).

    >>> found = ConceptAttention(concepts=("circle", "square", "background")).explain(model, run, step=15)
    >>> found.token_maps["0:circle"].shape, found.saliency  # (H_lat, W_lat): the first concept's map
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from diffusers.models.embeddings import apply_rotary_emb

from ..families.base import call_argument
from ..maps import normalise
from ..replay import raw_prediction, step_inputs
from .base import Explanation, Method, check_choice

BLOCKS = ("all", "last half")
FAMILIES = ("sd3", "flux")  # MM-DiTs: the text has its own stream through joint-attention blocks


@dataclass(kw_only=True)
class ConceptAttention(Method):
    """Maps of ``concepts`` (words, which need not be in the prompt) at one step.

    Returns (from ``explain``):
        ``Explanation`` with ``token_maps`` keyed ``"i:concept"``: the output-space maps (for every
        latent cell the concepts' shares, summing to 1 over the concepts), ``saliency`` the first
        concept's map (min-max), ``per_layer`` the raw-attention maps by the same keys (each image
        query's attention over the concept keys alone, heads and blocks averaged), ``token_scores``
        each concept's share of the picture, ``denoiser_calls`` = 1.

    The blocks are the joint-attention blocks: all of SD 3's; FLUX.1's double-stream blocks only (its
    single-stream blocks share one set of projections between text and image and carry no concepts,
    as in the authors' FLUX code). ``blocks="last half"`` is the deeper half of those.
    """

    concepts: tuple[str, ...] = field(default=("circle", "background"))
    blocks: str = "all"  # "all", or "last half": the deeper blocks, where concepts are most separated
    name = "concept-attention"
    label = "ConceptAttention"
    saliency_tab = False

    def _check_options(self) -> None:
        check_choice("blocks", self.blocks, BLOCKS)
        if not self.concepts or not all(isinstance(c, str) and c.strip() for c in self.concepts):
            raise ValueError(f"concepts must be one or more words, got {self.concepts!r}.")

    def _explain(self, model, run, step: int) -> Explanation:
        if model.family.name not in FAMILIES:
            raise ValueError(f"ConceptAttention needs a model whose blocks attend jointly over image and text (the SD 3 "
                             f"and FLUX.1 families); {model.id} is of the {model.family.name!r} family.")
        inputs = step_inputs(model, run, step)
        concepts = _concept_states(model, self.concepts)  # (C, D)
        transformer = model.denoiser
        blocks = list(transformer.transformer_blocks)  # FLUX: the double-stream blocks only
        chosen = range(len(blocks) // 2, len(blocks)) if self.blocks == "last half" else range(len(blocks))
        stream = _ConceptStream(concepts, inputs.conditioning.halves - 1, run.latent_size, model.family, set(chosen))
        with torch.no_grad(), stream.riding(blocks):
            raw_prediction(model, inputs, inputs.latents)
        output_maps, raw_maps = stream.maps()  # (C, H, W) each
        keys = [f"{i}:{concept}" for i, concept in enumerate(self.concepts)]
        explanation = self._result(run, step, output_maps[0], token_maps=dict(zip(keys, output_maps)),
                                   token_scores={k: float(m.mean()) for k, m in zip(keys, output_maps)})
        explanation.per_layer = {key: normalise(m) for key, m in zip(keys, raw_maps)}
        explanation.denoiser_calls = 1
        return explanation


def _concept_states(model, concepts: tuple[str, ...]) -> torch.Tensor:
    """Each concept's text state as the transformer's blocks receive text: the concept encoded alone as
    a prompt, its word's pieces averaged (SD 3: both CLIP encoders' states, where its words are; FLUX.1:
    T5's), through the transformer's context embedder: (C, D)."""
    family, pipe = model.family, model.pipe
    states = []
    for concept in concepts:
        model.check_prompt(concept)
        words = family.tokenize(pipe, concept).words
        if len(words) != 1:
            raise ValueError(f"A concept is one word, got {concept!r}.")
        encoded = family.encode(pipe, concept, "", guided=False, max_sequence_length=model.spec.max_sequence_length)
        text = encoded.tensors["encoder_hidden_states"][0]  # (L, D_text)
        states.append(text[list(words[0].positions)].mean(0))
    with torch.no_grad():
        return model.denoiser.context_embedder(torch.stack(states))


class _ConceptStream:
    """The concepts' states through the blocks, and the maps each chosen block gives."""

    def __init__(self, states: torch.Tensor, conditional: int, latent_size, family, chosen: set[int]):
        self.states, self.conditional, self.latent_size, self.family, self.chosen = states, conditional, latent_size, family, chosen
        self.flux = family.name == "flux"  # rotary positions over [text; image], text first
        self.output_maps: list[torch.Tensor] = []
        self.raw_maps: list[torch.Tensor] = []
        self._seen: dict = {}

    @contextmanager
    def riding(self, blocks):
        """Hooks on every block (this thread only) that read the image stream and move the concepts on."""
        thread = threading.get_ident()
        handles = []

        def keep(name):
            def hook(module, args, output):
                if threading.get_ident() == thread:
                    self._seen[name] = output
            return hook

        def keep_input(module, args):
            if threading.get_ident() == thread:
                self._seen["attention_output"] = args[0]

        def before_block(module, args, kwargs):
            if threading.get_ident() == thread:
                self._seen.clear()
                self._seen["temb"] = call_argument(args, kwargs, 2, "temb")
                if self.flux:
                    self._seen["rotary"] = call_argument(args, kwargs, 3, "image_rotary_emb")
                    self._seen["text_tokens"] = call_argument(args, kwargs, 1, "encoder_hidden_states").shape[1]

        for index, block in enumerate(blocks):
            attn = block.attn
            handles += [attn.to_q.register_forward_hook(keep("query")), attn.to_k.register_forward_hook(keep("key")),
                        attn.to_v.register_forward_hook(keep("value")),
                        attn.to_out[0].register_forward_pre_hook(keep_input),
                        block.register_forward_pre_hook(before_block, with_kwargs=True),
                        block.register_forward_hook(self._after_block(index, thread))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _after_block(self, index: int, thread: int):
        def hook(block, args, output):
            if threading.get_ident() == thread:
                self._ride(block, index)
        return hook

    def _ride(self, block, index: int) -> None:
        attn, seen, half = block.attn, self._seen, self.conditional
        heads = attn.heads
        temb = seen["temb"][half:half + 1]
        concepts = self.states[None]  # (1, C, D)
        if "query" not in seen:
            raise ValueError("ConceptAttention reads the image's projections (to_q, to_k, to_v) one by one; "
                             "this model's attention fuses them.")

        def split(x):  # (1, T, heads * d) -> (1, heads, T, d)
            return x.view(1, x.shape[1], heads, -1).transpose(1, 2)

        def rotate(x, rows):  # FLUX: the rotary embedding of positions ``rows`` of [text; image]
            if seen.get("rotary") is None:
                return x
            cos, sin = seen["rotary"]
            return apply_rotary_emb(x, (cos[rows], sin[rows]), sequence_dim=2)

        image_rows = slice(seen.get("text_tokens"), None)  # after the text, in FLUX's order
        concept_rows = [0] * concepts.shape[1]  # the text's position ids: FLUX's are all zero
        image_query, image_key, image_value = (split(seen[name][half:half + 1]) for name in ("query", "key", "value"))
        if attn.norm_q is not None:
            image_query = attn.norm_q(image_query)
        if attn.norm_k is not None:
            image_key = attn.norm_k(image_key)
        image_query, image_key = rotate(image_query, image_rows), rotate(image_key, image_rows)
        if getattr(block, "context_pre_only", False):  # SD 3's last block (FLUX's double-stream blocks have none)
            normed = block.norm1_context(concepts, temb)
        else:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(concepts, emb=temb)
        query, key, value = (split(projection(normed)) for projection in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            query = attn.norm_added_q(query)
        if attn.norm_added_k is not None:
            key = attn.norm_added_k(key)
        query, key = rotate(query, concept_rows), rotate(key, concept_rows)
        scale = query.shape[-1] ** -0.5
        # the concepts attend over the image and each other, never the other way round
        weights = torch.matmul(query * scale, torch.cat([image_key, key], 2).transpose(-1, -2)).softmax(-1)
        concept_output = torch.matmul(weights, torch.cat([image_value, value], 2))  # (1, heads, C, d)
        concept_output = concept_output.transpose(1, 2).reshape(1, -1, heads * concept_output.shape[-1])
        if index in self.chosen:  # the maps in float32, whatever the model's dtype
            image_output = seen["attention_output"][half].float()  # (N, heads * d): the image tokens' attention output
            self.output_maps.append(self._on_grid((image_output @ concept_output[0].float().T).softmax(-1)))
            raw = torch.matmul(image_query.float() * scale, key.float().transpose(-1, -2)).softmax(-1).mean(1)[0]  # (N, C)
            self.raw_maps.append(self._on_grid(raw))
        if not getattr(block, "context_pre_only", False):  # the concepts' residual stream moves on as the text's does
            moved = self.states[None] + gate_msa.unsqueeze(1) * attn.to_add_out(concept_output)
            normed = block.norm2_context(moved) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            moved = moved + gate_mlp.unsqueeze(1) * block.ff_context(normed)
            if self.flux and moved.dtype == torch.float16:  # as FLUX's block clips its text stream
                moved = moved.clip(-65504, 65504)
            self.states = moved[0]

    def _on_grid(self, per_token: torch.Tensor) -> torch.Tensor:
        """(N image tokens, C) -> (C, H_lat, W_lat), bilinear from the patch grid."""
        height, width = self.family.layer_grid(per_token.shape[0], self.latent_size)
        maps = per_token.T.reshape(1, -1, height, width).float()
        if (height, width) != tuple(self.latent_size):
            maps = F.interpolate(maps, size=self.latent_size, mode="bilinear", align_corners=False)
        return maps[0]

    def maps(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.output_maps:
            raise ValueError("No joint-attention block was read: is this an MM-DiT?")
        return (torch.stack(self.output_maps).mean(0).numpy(), torch.stack(self.raw_maps).mean(0).numpy())
