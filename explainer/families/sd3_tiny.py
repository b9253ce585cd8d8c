"""A tiny Stable Diffusion 3 pipeline built from configs, with random weights.

It has the structure of SD 3.5 Medium (an MM-DiT with joint attention, a second image-only attention
and QK normalisation in its first block, the last block's text stream cut short; two CLIP text
encoders with projections whose states are padded to the transformer's text width; no T5, so the
pipeline appends zero tokens; an AutoencoderKL with a scaling and a shift factor; flow matching
stepped by Euler with a shift of 3) at a size that runs in milliseconds on a CPU. Tests use it.
Nothing is downloaded: the tokenizer files are written by ``tiny``.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from .tiny import clip_text_config, make_shifted_vae, make_tokenizer_pair, quiet

LATENT_CHANNELS = 8
CLIP_WIDTHS = (16, 24)  # CLIP-L's and CLIP-G's hidden sizes (and projections), side by side 40 < the text width
TEXT_WIDTH = 48  # the transformer's joint_attention_dim: the CLIP states are padded to it


def tiny_sd3_pipeline(seed: int = 0, max_length: int = 77, shift: float = 3.0) -> StableDiffusion3Pipeline:
    """A randomly initialised SD3-shaped pipeline: 64x64 images, 8x8x8 latents, 4x4 patches of 2x2."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        caption_projection_dim=16,
        pooled_projection_dim=sum(CLIP_WIDTHS),
        pos_embed_max_size=8,  # images up to 128x128
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = make_shifted_vae(LATENT_CHANNELS)
    tokenizer, tokenizer_2 = make_tokenizer_pair(max_length)
    text_encoder = CLIPTextModelWithProjection(clip_text_config(tokenizer, CLIP_WIDTHS[0], projection_dim=CLIP_WIDTHS[0]))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2, CLIP_WIDTHS[1], projection_dim=CLIP_WIDTHS[1]))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return quiet(pipe)
