"""A tiny Stable Diffusion pipeline built from configs, with random weights.

It has the structure of SD v1 (CLIP text encoder and BPE tokenizer, a UNet with self- and
cross-attention at two resolutions, an AutoencoderKL with 4 latent channels) at a size that
runs in milliseconds on a CPU. Tests use it, and the app falls back to it when the embedded
model is missing. Nothing is downloaded: the tokenizer files are written by ``tiny``.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

# write_tokenizer_files is imported from here too (benchmarks/common.py)
from .tiny import clip_text_config, make_tokenizer, make_vae, quiet, write_tokenizer_files  # noqa: F401


def tiny_pipeline(seed: int = 0, max_length: int = 77) -> StableDiffusionPipeline:
    """A randomly initialised SD-shaped pipeline: 64x64 images, 8x8x4 latents, DPM-Solver++."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = make_vae()
    tokenizer = make_tokenizer(max_length)
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, 32, heads=4))
    return sd1_pipeline(unet, vae, text_encoder, tokenizer)


def sd1_pipeline(unet, vae, text_encoder, tokenizer) -> StableDiffusionPipeline:
    """A Stable Diffusion 1.x pipeline assembled from its parts, with SD's noise schedule stepped by
    DPM-Solver++ and no safety checker (the tiny test model; the benchmarks' SD-shaped one)."""
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return quiet(pipe)
