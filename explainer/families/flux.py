"""FLUX.1 (Black Forest Labs): an MM-DiT (``FluxTransformer2DModel``) of double-stream blocks, whose
joint attention runs over [text tokens; image tokens] (text FIRST; SD 3 puts the image first), then
single-stream blocks, one attention over the same concatenation. The text is T5's tokens (the keys
the maps read) and CLIP's pooled output; the image tokens are the latent's 2x2 patches packed into
channels, placed by rotary position ids. Flow matching (x_sigma = (1 - sigma) x0 + sigma eps, the model
predicts v = eps - x0) with a resolution-dependent shift, stepped by Euler; a VAE with a scaling and a
shift factor. Guidance-distilled: one prediction per step, never an unconditional half; FLUX.1-dev
takes the guidance scale as an input (an embedding), FLUX.1-schnell takes none.

The run keeps its latents unpacked, (B, C, h, w) as every family's; ``predict`` packs them for the
transformer and unpacks its output.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxAttention
from transformers.models.t5.modeling_t5 import T5Attention

from ..capture import flux_attention
from ..schedules import flow_sigmas
from ..tokens import PromptTokens, Word
from .base import Conditioning, Family, call_argument
from .sd3 import StableDiffusion3

_TEXT = "encoder_hidden_states"  # (halves, L, D): T5's last hidden state
_POOLED = "pooled_projections"  # (halves, P): CLIP's pooled output
_GUIDANCE = "guidance"  # (halves,): FLUX.1-dev's guidance scale, float32
_PROCESSOR_SUFFIX = ".processor"
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)$")
_SITE_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_BLOCK_KIND = {"transformer_blocks": "double", "single_transformer_blocks": "single"}
_PIPELINE_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length
_WORD_START = "▁"  # sentencepiece's mark of a piece that begins a word
# FLUX's VAE (scaling and shift factors) and its flow matching stepped by Euler are SD 3's kind.
_SD3 = StableDiffusion3()


def resolution_shift(image_tokens: int, config) -> float:
    """mu of FLUX's resolution-dependent shift, as the pipeline computes it (``calculate_shift``): linear
    in the image's token count (the packed latent's), from ``base_shift`` at ``base_image_seq_len``
    tokens to ``max_shift`` at ``max_image_seq_len``; FLUX's defaults where the config lacks one."""
    base_length, max_length = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_length - base_length)
    intercept = base_shift - slope * base_length
    return image_tokens * slope + intercept


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch one token, row-major, as the pipeline packs."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of ``pack``."""
    batch, _, packed_channels = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, packed_channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, packed_channels // 4, height, width)


def image_position_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """The packed tokens' rotary position ids (h/2 * w/2, 3): (0, row, column), as the pipeline builds them."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# --- T5's text side


def t5_tokenize(tokenizer, prompt: str, max_length: int) -> PromptTokens:
    """Tokenise ``prompt`` as the pipeline does for T5 (padded to ``max_length``, its end token ``</s>``
    last when cut; no start token) and group the pieces into words (``t5_words``)."""
    encoded = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True, return_offsets_mapping=True)
    ids = list(encoded.input_ids)
    end_position = ids.index(tokenizer.eos_token_id)
    pieces = tokenizer.convert_ids_to_tokens(ids[:end_position])
    words = t5_words(pieces, encoded.offset_mapping[:end_position], prompt)
    full = tokenizer(prompt, truncation=False, return_offsets_mapping=True, verbose=False)
    truncated = ""
    if len(full.input_ids) > max_length:  # the first piece cut is the one the end token replaced
        truncated = prompt[full.offset_mapping[max_length - 1][0]:].strip()
    return PromptTokens(words=tuple(words), ids=tuple(ids), start_position=None, end_position=end_position,
                        max_length=max_length, truncated=truncated)


def t5_words(pieces: list[str], spans: list[tuple[int, int]], prompt: str) -> list[Word]:
    """Group sentencepiece pieces into words; each word's text is the prompt's own characters.

    A piece beginning with "▁" begins a word (sentencepiece marks the start of every space-separated
    chunk so); within a chunk, a run of pieces of punctuation only (no letter or digit) is a word of its
    own, so "circle," gives "circle" and "," as CLIP's words do. ``spans`` are the pieces' character spans in
    ``prompt`` (the fast tokenizer's offsets): an unknown piece (``<unk>``) reads as what it stands for.
    A bare "▁" (before a piece that has no "▁" form) stands for no character and joins the next piece.
    """
    groups: list[list[int]] = []
    kinds: list[str] = []  # "mark" (a bare "▁" so far), "word" or "punct"
    texts = ["" if piece == _WORD_START else prompt[start:end] for piece, (start, end) in zip(pieces, spans)]
    for position, (piece, text) in enumerate(zip(pieces, texts)):
        kind = "mark" if not text else ("word" if any(char.isalnum() for char in text) else "punct")
        if groups and not piece.startswith(_WORD_START) and kinds[-1] in ("mark", kind):
            groups[-1].append(position)
            kinds[-1] = kind if kinds[-1] == "mark" else kinds[-1]
        else:
            groups.append([position])
            kinds.append(kind)
    words = []
    for positions in groups:
        covered = [spans[p] for p in positions if texts[p]]
        if covered:  # a bare "▁" left alone (cut by truncation) names no word
            text = prompt[min(start for start, _ in covered):max(end for _, end in covered)]
            words.append(Word(text, tuple(positions), tuple(pieces[p] for p in positions)))
    return words


def t5_whole_words(tokenizer) -> set[str]:
    """The words T5's vocabulary holds as one piece (a piece beginning with "▁")."""
    vocabulary = tokenizer.get_vocab()
    return {piece.removeprefix(_WORD_START) for piece in vocabulary if piece.startswith(_WORD_START) and len(piece) > 1}


def t5_attention(module: T5Attention, hidden_states, attention_mask=None, position_bias=None):
    """T5's self-attention with an explicit softmax: (its output, its probabilities (B, heads, L, L), the
    position bias it added). T5 does not scale QK^T; it adds a relative position bias, which its first
    layer computes and every later layer is given (``position_bias``; computed here when absent)."""
    batch, length, _ = hidden_states.shape

    def split(x):  # (batch, L, heads * dim) -> (batch, heads, L, dim)
        return x.view(batch, length, -1, module.key_value_proj_dim).transpose(1, 2)

    query, key, value = (split(projection(hidden_states)) for projection in (module.q, module.k, module.v))
    if position_bias is None:
        if module.has_relative_attention_bias:
            position_bias = module.compute_bias(length, length, device=query.device)
        else:
            position_bias = torch.zeros((1, module.n_heads, length, length), device=query.device, dtype=query.dtype)
    scores = torch.matmul(query, key.transpose(-1, -2)) * module.scaling + position_bias
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # True: attend
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    elif attention_mask is not None:  # additive
        scores = scores + attention_mask
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(probs, value).transpose(1, 2).reshape(batch, length, -1)
    return module.o(output), probs, position_bias


class Flux(Family):
    name = "flux"
    pipeline_class = "FluxPipeline"
    architecture = "MM-DiT"

    def load(self, source, device, dtype, local_files_only):
        pipe = FluxPipeline.from_pretrained(source, dtype=dtype, local_files_only=local_files_only, use_safetensors=True)
        return pipe.to(device)

    def denoiser(self, pipe):
        return pipe.transformer

    def latent_channels(self, pipe):
        """The VAE's latent channels: the transformer takes them packed, four times as many."""
        return pipe.transformer.config.in_channels // 4

    def latent_size(self, pipe, width, height):
        """(H_lat, W_lat); a ValueError unless the latent is whole 2x2 patches."""
        factor = pipe.vae_scale_factor
        if width % (2 * factor) or height % (2 * factor):
            raise ValueError(f"width and height must be multiples of {2 * factor} for this model, got {width}x{height}.")
        return height // factor, width // factor

    def rebuilt(self, pipe, denoiser):
        return type(pipe)(**{**pipe.components, "transformer": denoiser})

    def example_inputs(self, denoiser, latent_size, max_sequence_length=None):
        """T5's tokens (``max_sequence_length``, the pipeline's 512 by default), CLIP's pooled output, the
        packed latent's tokens and both position ids; the guidance scale where the model takes one."""
        transformer = denoiser.config
        text_tokens = max_sequence_length or _PIPELINE_MAX_SEQUENCE_LENGTH
        image_tokens = (latent_size[0] // 2) * (latent_size[1] // 2)
        inputs = {"hidden_states": torch.zeros(1, image_tokens, transformer.in_channels), "timestep": torch.ones(1),
                  _TEXT: torch.zeros(1, text_tokens, transformer.joint_attention_dim),
                  _POOLED: torch.zeros(1, transformer.pooled_projection_dim),
                  "img_ids": torch.zeros(image_tokens, 3), "txt_ids": torch.zeros(text_tokens, 3)}
        return inputs | ({_GUIDANCE: torch.ones(1)} if transformer.guidance_embeds else {})

    # --- text: the prompt's tokens are T5's (the joint attention's text keys); CLIP gives the pooled part
    def tokenize(self, pipe, prompt, max_sequence_length=None):
        return t5_tokenize(pipe.tokenizer_2, prompt, max_sequence_length or _PIPELINE_MAX_SEQUENCE_LENGTH)

    def vocabulary(self, pipe):
        return t5_whole_words(pipe.tokenizer_2)

    def encode(self, pipe, prompt, negative_prompt, guided, max_sequence_length=None):
        """T5's last hidden state (``max_sequence_length`` tokens) and CLIP's pooled output, as the pipeline
        encodes them. ``guided`` (DF-CAM's "guidance" target only: a FLUX run never has an unconditional
        half) puts the negative prompt's first, as the pipeline's true classifier-free guidance does."""
        length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        device = pipe.transformer.device
        text, pooled, _ = pipe.encode_prompt(prompt, None, device=device, num_images_per_prompt=1, **length)
        if not guided:
            return Conditioning({_TEXT: text, _POOLED: pooled})
        negative_text, negative_pooled, _ = pipe.encode_prompt(
            negative_prompt or "", None, device=device, num_images_per_prompt=1, **length
        )
        return Conditioning({_TEXT: torch.cat([negative_text, text]), _POOLED: torch.cat([negative_pooled, pooled])})

    # --- guidance: distilled into the model
    def guided(self, guidance):
        """Never: FLUX.1 is guidance-distilled (one prediction per step, whatever the scale)."""
        return False

    def with_guidance(self, pipe, conditioning, guidance):
        """FLUX.1-dev (``guidance_embeds``) takes the scale as an input, one float32 value per row, as the
        pipeline passes it; FLUX.1-schnell takes none."""
        if not pipe.transformer.config.guidance_embeds:
            return conditioning
        values = torch.full((conditioning.halves,), float(guidance), dtype=torch.float32, device=pipe.transformer.device)
        return Conditioning(conditioning.tensors | {_GUIDANCE: values})

    # --- denoising: flow matching
    def scheduler(self, pipe, settings):
        """The pipeline's Euler scheduler on the run's sigmas: uniform as the pipeline spaces them
        (1 .. 1/n), early and latter (and explicit lists) from ``schedules.flow_sigmas``; the model's shift
        applies to both: resolution-dependent with mu from the packed latent's token count, as the
        pipeline computes it (FLUX.1-dev), or static (FLUX.1-schnell: 1, none). ``settings.scheduler``
        does not apply."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        height, width = self.latent_size(pipe, settings.width, settings.height)
        mu = resolution_shift((height // 2) * (width // 2), scheduler.config)  # the scheduler ignores it without dynamic shifting
        sigmas = flow_sigmas(settings.schedule, settings.steps, settings.concentration, scheduler.config.num_train_timesteps)
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / settings.steps, settings.steps)  # the pipeline's own spacing
        scheduler.set_timesteps(sigmas=sigmas, device=pipe.transformer.device, mu=mu)
        return scheduler

    def noise_levels(self, scheduler, timestep):
        return _SD3.noise_levels(scheduler, timestep)

    def predict(self, pipe, latent_input, timestep, conditioning, recorder=None):
        """The transformer's velocity for latents (B, C, h, w), packed in and unpacked out; the timestep
        and guidance as the pipeline passes them (t / 1000 in the latents' dtype; the model scales both
        by 1000). With a ``recorder``, the capture processors also get the text length."""
        transformer = pipe.transformer
        tensors = conditioning.tensors
        if transformer.config.guidance_embeds and _GUIDANCE not in tensors:
            raise ValueError("This FLUX model takes the guidance scale as an input: encode with it "
                             "(LoadedModel.encode(..., guidance=w)).")
        batch, _, height, width = latent_input.shape
        text = tensors[_TEXT]
        timestep = torch.as_tensor(timestep, device=latent_input.device).expand(batch).to(latent_input.dtype)
        output = transformer(
            hidden_states=pack(latent_input), timestep=timestep / 1000, **tensors,
            txt_ids=torch.zeros(text.shape[1], 3, device=latent_input.device, dtype=latent_input.dtype),
            img_ids=image_position_ids(height, width, latent_input.device, latent_input.dtype),
            joint_attention_kwargs=None if recorder is None else {"recorder": recorder, "text_tokens": text.shape[1]},
            return_dict=False,
        )[0]
        return unpack(output, height, width)

    def clean_estimate(self, scheduler, latents, output, timestep):
        """x0_hat = x_sigma - sigma v."""
        return _SD3.clean_estimate(scheduler, latents, output, timestep)

    def noise_estimate(self, scheduler, latents, output, timestep):
        """eps_hat = x_sigma + (1 - sigma) v."""
        return _SD3.noise_estimate(scheduler, latents, output, timestep)

    def noised(self, scheduler, clean, noise, timestep):
        return _SD3.noised(scheduler, clean, noise, timestep)

    def replay_step(self, scheduler, latents, output, timestep, next_timestep):
        """Euler, the run's own step: x_next = x_sigma + (sigma_next - sigma) v, in float32."""
        return _SD3.replay_step(scheduler, latents, output, timestep, next_timestep)

    # --- pictures: unpacked latents, z / scaling_factor + shift_factor, as SD 3's
    def decode(self, pipe, latents, output_type="pil"):
        return _SD3.decode(pipe, latents, output_type)

    def encode_pictures(self, pipe, pixels):
        return _SD3.encode_pictures(pipe, pixels)

    def fit_preview(self, pipe):
        return _SD3.fit_preview(pipe)

    # --- attention and layers
    def cross_attention_sites(self, denoiser):
        """Every attention of the transformer (each attends over text and image): the double-stream
        blocks', then the single-stream blocks'."""
        return [key for key in denoiser.attn_processors
                if isinstance(denoiser.get_submodule(key.removesuffix(_PROCESSOR_SUFFIX)), FluxAttention)]

    def attention_modules(self, denoiser):
        return [denoiser.get_submodule(key.removesuffix(_PROCESSOR_SUFFIX)) for key in denoiser.attn_processors]

    def layer_grid(self, tokens, latent_size):
        """The packed grid, (H_lat / 2, W_lat / 2): every block sees the same image tokens."""
        height, width = latent_size
        if height % 2 or width % 2 or tokens != (height // 2) * (width // 2):
            raise ValueError(f"{tokens} image tokens are not the 2x2 patches of a latent of size {latent_size}.")
        return height // 2, width // 2

    def layer_group(self, site, grid, sites=()):
        """The blocks of one kind in the same third of the depth, e.g. "double blocks 0–18", "single blocks
        0–18", "single blocks 19–37" (FLUX.1's 19 + 38 blocks fall into exactly these)."""
        if site not in sites:
            raise ValueError(f"{site!r} is not among the sites {list(sites)}: FLUX's groups need them all.")

        def key(index):
            return index * 3 // len(sites), _kind(sites[index])

        mine = key(sites.index(site))
        members = [_block(other) for index, other in enumerate(sites) if key(index) == mine]
        kind = _kind(site)
        return f"{kind} blocks {members[0]}–{members[-1]}" if len(members) > 1 else f"{kind} block {members[0]}"

    def explicit_attention(self, module, hidden_states, encoder_hidden_states, attention_mask, temb, on_probs,
                           text_tokens: int | None = None):
        """FLUX's attention redone explicitly (``capture.flux_attention``). ``temb`` is the call's rotary
        embedding (a ``FluxAttention`` takes it fifth, where diffusers' ``Attention`` takes temb); a
        single-stream call (no ``encoder_hidden_states``) needs ``text_tokens``, the length of the text in
        front of its image tokens. ``on_probs`` sees kind "joint", image tokens first."""
        return flux_attention(module, hidden_states, encoder_hidden_states, attention_mask, temb, text_tokens,
                              on_probs=lambda probs: on_probs(probs, "joint"))

    def hooked_attention(self, module, args, kwargs, latent_size, on_probs):
        """A ``FluxAttention`` call (hidden states, encoder hidden states, mask, rotary embedding) redone
        explicitly. A single-stream call does not say where its text ends: its image tokens are the
        packed grid of ``latent_size``, and the text is the rest, in front."""
        hidden_states = call_argument(args, kwargs, 0, "hidden_states")
        encoder_hidden_states = call_argument(args, kwargs, 1, "encoder_hidden_states")
        attention_mask = call_argument(args, kwargs, 2, "attention_mask")
        rotary = call_argument(args, kwargs, 3, "image_rotary_emb")
        text_tokens = None
        if encoder_hidden_states is not None:
            image_tokens = hidden_states.shape[1]
        elif latent_size is None:
            raise ValueError("A single-stream FLUX attention needs the step's latent size to find its image tokens.")
        else:
            image_tokens = (latent_size[0] // 2) * (latent_size[1] // 2)
            text_tokens = hidden_states.shape[1] - image_tokens
        return self.explicit_attention(module, hidden_states, encoder_hidden_states, attention_mask, rotary,
                                       lambda probs, kind: on_probs(probs, kind, image_tokens), text_tokens=text_tokens)

    def explained_layers(self, denoiser):
        """Every double-stream block, then every single-stream block."""
        return [name for name, _ in denoiser.named_modules() if _BLOCK.match(name)]

    def explained_output(self, output):
        """Both kinds of block return (text tokens, image tokens); the image tokens (B, N, C)."""
        return output[1]

    def text_attention_modules(self, pipe):
        """T5's self-attention modules (the encoder whose tokens the maps read)."""
        return [module for module in pipe.text_encoder_2.modules() if isinstance(module, T5Attention)]

    def text_attention(self, module, hidden_states, attention_mask):
        output, probs, _ = t5_attention(module, hidden_states, attention_mask)
        return output, probs

    def hooked_text_attention(self, module, args, kwargs, hidden_states):
        """A ``T5Attention`` call (its mask is ``mask``; later layers are given the first one's position
        bias) redone explicitly; it returns (output, position bias, probabilities), as the module does."""
        output, probs, position_bias = t5_attention(module, hidden_states, kwargs.get("mask"), kwargs.get("position_bias"))
        return (output, position_bias, probs), probs

    def encode_ids(self, pipe, ids, conditioning):
        """T5's part of the conditional half rebuilt from ``ids`` (1, L), as the pipeline encodes them;
        CLIP's pooled output (and the guidance) as ``conditioning`` holds them."""
        text = conditioning.tensors[_TEXT]
        states = pipe.text_encoder_2(ids, output_hidden_states=False)[0]
        return conditioning.with_conditional(_TEXT, states.to(text.dtype))


def _kind(site: str) -> str:
    return _BLOCK_KIND[_SITE_BLOCK.match(site).group(1)]


def _block(site: str) -> int:
    return int(_SITE_BLOCK.match(site).group(2))


__all__ = ["Flux", "pack", "resolution_shift", "t5_tokenize", "t5_words", "unpack"]
