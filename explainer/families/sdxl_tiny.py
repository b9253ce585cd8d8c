"""A tiny Stable Diffusion XL pipeline built from configs, with random weights.

It has the structure of SDXL base 1.0 (two CLIP text encoders, the second with a projection, whose
penultimate states are side by side; a UNet whose first block has no attention and whose lower two
resolutions cross-attend with several transformer layers per block, taking the pooled text
embedding and the added time ids through ``addition_embed_type="text_time"``; an AutoencoderKL with
SDXL's scaling factor and ``force_upcast``; SDXL's own scheduler config, Euler with "leading"
timestep spacing) at a size that runs in milliseconds on a CPU. Tests use it. Nothing is downloaded:
the tokenizer files are written by ``tiny``.
"""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .tiny import clip_text_config, make_tokenizer_pair, make_vae, quiet

CLIP_WIDTHS = (16, 24)  # CLIP-L's and OpenCLIP-G's hidden sizes: side by side, the UNet's cross_attention_dim
POOLED_WIDTH = 32  # the second encoder's projection (SDXL: 1280), the pooled ``text_embeds``
TIME_EMBED_WIDTH = 8  # addition_time_embed_dim (SDXL: 256), for each of the 6 time ids

# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json (the keys Euler does
# not take, such as set_alpha_to_one, are kept in its config and reach DDIM as they do for SDXL)
SDXL_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def tiny_sdxl_pipeline(seed: int = 0, max_length: int = 77) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL-shaped pipeline: 64x64 images, 8x8x4 latents, cross-attention on
    the 4x4 and 2x2 grids (one and two transformer layers per block), SDXL's Euler scheduler config."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),  # as SDXL's config, this names the heads (head width 8)
        use_linear_projection=True,
        cross_attention_dim=sum(CLIP_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_WIDTH,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_WIDTH + POOLED_WIDTH,
        norm_num_groups=8,
    )
    vae = make_vae(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE
    tokenizer, tokenizer_2 = make_tokenizer_pair(max_length)
    # three layers: the penultimate layer's states are used, so two layers reach them
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, CLIP_WIDTHS[0], layers=3))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2, CLIP_WIDTHS[1], layers=3, projection_dim=POOLED_WIDTH))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,  # as SDXL base's model_index.json
        add_watermarker=False,
    )
    return quiet(pipe)
